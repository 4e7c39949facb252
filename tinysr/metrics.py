"""Image-quality metrics on pyiqa, with the conventions of the SR literature.

PSNR and SSIM are on the Y channel of YCbCr with no border crop (pyiqa's defaults differ).
NIQE uses the pristine-image statistics shipped in `assets/` (basicsr 1.4.2's numbers), so it
runs offline. Every other metric needs downloaded weights; when they are absent the metric is
reported unavailable with the file it needs and the folder it belongs in, and the rest still run.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import missing_extra_message
from .weights import ASSETS

NIQE_PARAMS = ASSETS / "niqe_modelparameters.mat"


def torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir())


@dataclass(frozen=True)
class MetricSpec:
    pyiqa_name: str
    kind: str  # "fr" (needs ground truth), "nr" (no reference), "fid" (folder vs folder)
    lower_better: bool
    files: tuple[str, ...] = ()  # paths relative to the torch hub dir, or "hf:repo_id" for the HF cache
    kwargs: tuple = ()


# Column order of the paper's Table A.1, then the extra metrics of Table C.3.
METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec("psnr", "fr", False, (), (("test_y_channel", True), ("color_space", "ycbcr"))),
    "ssim": MetricSpec("ssim", "fr", False, (), (("test_y_channel", True), ("color_space", "ycbcr"))),
    "lpips": MetricSpec("lpips", "fr", True, ("pyiqa/LPIPS_v0.1_alex-df73285e.pth", "checkpoints/alexnet-owt-7be5be79.pth")),
    "dists": MetricSpec("dists", "fr", True, ("pyiqa/DISTS_weights-f5e65c96.pth", "checkpoints/vgg16-397923af.pth")),
    "fid": MetricSpec("fid", "fid", True, ("pyiqa/pt_inception-2015-12-05-6726825d.pth",)),
    "niqe": MetricSpec("niqe", "nr", True),
    "musiq": MetricSpec("musiq", "nr", False, ("pyiqa/musiq_koniq_ckpt-e95806b9.pth",)),
    "maniqa": MetricSpec(
        "maniqa-pipal", "nr", False, ("pyiqa/MANIQA_PIPAL-ae6d356b.pth", "hf:timm/vit_base_patch8_224.augreg2_in21k_ft_in1k")
    ),
    "clipiqa": MetricSpec("clipiqa", "nr", False, ("clip/RN50.pt",)),
    "topiq_nr": MetricSpec("topiq_nr", "nr", False, ("pyiqa/cfanet_nr_koniq_res50-9a73138b.pth", "hf:timm/resnet50.a1_in1k")),
    "qalign": MetricSpec("qalign", "nr", False, ("hf:q-future/one-align",)),
}
DEFAULT_METRICS = ["psnr", "ssim", "lpips", "dists", "fid", "niqe", "musiq", "maniqa", "clipiqa"]


def missing_files(spec: MetricSpec) -> list[str]:
    """Weight files the metric needs that are not on disk, as 'file (in folder)'."""
    missing = []
    for item in spec.files:
        if item.startswith("hf:"):
            from huggingface_hub import scan_cache_dir

            repo = item[3:]
            try:
                cached = {r.repo_id for r in scan_cache_dir().repos}
            except Exception:
                cached = set()
            if repo not in cached:
                from huggingface_hub.constants import HF_HUB_CACHE

                missing.append(f"hub repo {repo} (in {HF_HUB_CACHE})")
        else:
            path = torch_hub_dir() / item
            if not path.is_file():
                missing.append(f"{path.name} (in {path.parent})")
    return missing


class MetricSuite:
    """Creates each requested metric once; unavailable ones are listed in `unavailable` with the reason."""

    def __init__(self, names=None, device=None, allow_download: bool | None = None):
        names = list(names or DEFAULT_METRICS)
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
        self.names = [n for n in METRICS if n in names]
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if allow_download is None:
            allow_download = os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false")
        self.allow_download = allow_download
        self.unavailable: dict[str, str] = {}
        self._metrics: dict = {}

    def available(self, kind: str | None = None) -> list[str]:
        return [n for n in self.names if n not in self.unavailable and (kind is None or METRICS[n].kind == kind)]

    def metric(self, name: str):
        """The pyiqa metric, created on first use; None (and recorded) when it cannot be."""
        if name in self._metrics or name in self.unavailable:
            return self._metrics.get(name)
        spec = METRICS[name]
        missing = missing_files(spec)
        if missing and not self.allow_download:
            self.unavailable[name] = "weights not found: " + "; ".join(missing)
            return None
        kwargs = dict(spec.kwargs)
        if name == "niqe":
            kwargs["pretrained_model_path"] = str(NIQE_PARAMS)
        try:
            import pyiqa

            self._metrics[name] = pyiqa.create_metric(spec.pyiqa_name, device=self.device, **kwargs)
        except Exception as e:  # pyiqa raises URLError, OSError, RuntimeError or ImportError for absent weights
            detail = "; ".join(missing) if missing else (isinstance(e, ImportError) and missing_extra_message(e)) or f"{type(e).__name__}: {e}"
            self.unavailable[name] = f"could not load ({detail})"
            return None
        return self._metrics[name]

    @torch.no_grad()
    def score(self, pred: torch.Tensor, gt: torch.Tensor | None = None, names=None) -> dict[str, float]:
        """Per-image scores for (1, 3, H, W) RGB tensors in [0, 1]; full-reference metrics need `gt`."""
        pred = pred.to(self.device).float().clamp(0, 1)
        out = {}
        for name in names or self.names:
            kind = METRICS[name].kind
            if kind == "fid" or (kind == "fr" and gt is None):
                continue
            metric = self.metric(name)
            if metric is None:
                continue
            value = metric(pred, gt.to(self.device).float().clamp(0, 1)) if kind == "fr" else metric(pred)
            out[name] = float(value.reshape(-1)[0])
        return out

    def fid(self, pred_dir: Path, gt_dir: Path) -> float | None:
        if "fid" not in self.names:
            return None
        metric = self.metric("fid")
        if metric is None:
            return None
        return float(metric(str(pred_dir), str(gt_dir), num_workers=0))


def luminance(rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> (H, W), BT.601 weights: what the artefact scores below look at."""
    return (torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype).view(3, 1, 1) * rgb[:3]).sum(0)


def lattice_score(image: torch.Tensor, periods: tuple[int, ...] = (16, 8, 4), size: int = 512) -> float:
    """How strongly a periodic grid (patch-wise decoding, unpatchify) stands out: about 1.1 for photos.

    Luminance of the centre crop (at most `size`, a multiple of 16), mean removed, Hann-windowed; at
    every non-DC frequency of a lattice of the given periods (multiples of N/p on both axes), the
    FFT magnitude over the median magnitude of its 7x7 neighbourhood; the mean of those ratios.
    NIQE reads such a grid as texture; this does not.
    """
    rgb = image.float()
    n = min(size, *rgb.shape[-2:]) // 16 * 16
    if n < 32:
        raise ValueError(f"lattice_score needs at least 32x32 pixels, got {tuple(rgb.shape[-2:])}")
    top, left = (rgb.shape[-2] - n) // 2, (rgb.shape[-1] - n) // 2
    y = luminance(rgb[:, top : top + n, left : left + n])
    window = torch.hann_window(n, periodic=False, dtype=torch.float64)
    spectrum = torch.fft.fft2((y.double() - y.double().mean()) * torch.outer(window, window)).abs()
    lattice = {(u, v) for p in periods for u in range(0, n, n // p) for v in range(0, n, n // p)} - {(0, 0)}
    offsets = torch.arange(-3, 4)
    ratios = []
    for u, v in sorted(lattice):
        rows, cols = (u + offsets) % n, (v + offsets) % n
        ratios.append(float(spectrum[u, v] / spectrum[rows][:, cols].median().clamp_min(1e-12)))
    return sum(ratios) / len(ratios)


def blockiness(image: torch.Tensor, cell: int = 4) -> float:
    """How much more luminance steps across the boundaries of `cell`-px cells than inside them: about 1.0 for photos.

    A decoder that draws latent errors cell by cell (the demo teacher's patch VAE, 4 px) steps edges in blocks the
    lattice score does not see: blocks that differ from cell to cell put little of their energy at the lattice frequencies.
    Both axes: mean |step| between columns (rows) c*k - 1 and c*k over the mean |step| between the others.
    """
    rgb = image.float()
    if min(rgb.shape[-2:]) < 2 * cell:
        raise ValueError(f"blockiness needs at least {2 * cell}x{2 * cell} pixels, got {tuple(rgb.shape[-2:])}")
    y = luminance(rgb).double()
    ratios = []
    for plane in (y, y.T):
        steps = (plane[:, 1:] - plane[:, :-1]).abs()
        across = (torch.arange(steps.shape[1]) % cell) == cell - 1
        ratios.append(float(steps[:, across].mean() / steps[:, ~across].mean().clamp_min(1e-12)))
    return sum(ratios) / 2
