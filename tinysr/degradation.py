"""Real-ESRGAN second-order degradation: (GT, LQ) training pairs from clean photos.

This is the pipeline SeeSR, OSEDiff and TSD-SR train on (basicsr's RealESRGANDataset + RealESRGANModel.feed_data),
written out without the basicsr dependency. Every random draw comes from a numpy Generator that the caller passes in,
so one seed reproduces a pair bit for bit on any machine; the image operations run on the CPU with torch.
"""

import io
import math
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import special

from .errors import ImageError
from .imageio import list_images, load_image, to_pil

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_TYPES = ("up", "down", "keep")
RESIZE_MODES = ("area", "bilinear", "bicubic")
KERNEL_PAD_TO = 21  # every blur kernel is zero-padded to this size, as in basicsr
LUMA = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale weights, which basicsr's gray Poisson noise uses


@dataclass
class DegradationConfig:
    """Ranges and probabilities of the degradation; the defaults are Real-ESRGAN's (as used by SeeSR/OSEDiff/TSD-SR)."""

    scale: int = 4
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    hflip_prob: float = 0.5
    # first order
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)  # Gaussian sigma in 8-bit levels
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second order
    second_blur_prob: float = 0.8
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    final_sinc_prob: float = 0.8

    def with_strength(self, strength: float) -> "DegradationConfig":
        """Blur sigmas and noise levels times `strength`, JPEG quality loss (100 - q) times `strength`.

        1 keeps Real-ESRGAN's ranges; the app's strength slider uses this.
        """
        if not 0 < strength <= 4:
            raise ValueError(f"strength must be in (0, 4], got {strength}")

        def times(r):
            return (r[0] * strength, r[1] * strength)

        def quality(r):
            return tuple(float(np.clip(100 - (100 - q) * strength, 5, 100)) for q in r)

        return replace(
            self,
            blur_sigma=times(self.blur_sigma), blur_sigma2=times(self.blur_sigma2),
            noise_range=times(self.noise_range), noise_range2=times(self.noise_range2),
            poisson_scale_range=times(self.poisson_scale_range), poisson_scale_range2=times(self.poisson_scale_range2),
            jpeg_range=quality(self.jpeg_range), jpeg_range2=quality(self.jpeg_range2),
        )


# ----------------------------------------------------------------------------------------------- kernels


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """x^T Sigma^-1 x on a size x size grid centred on the middle pixel, Sigma = R(theta) diag(sx^2, sy^2) R^T."""
    ax = np.arange(size) - (size - 1) / 2
    xx, yy = np.meshgrid(ax, ax)
    u = math.cos(theta) * xx + math.sin(theta) * yy  # R^T x: coordinates along the kernel's own axes
    v = -math.sin(theta) * xx + math.cos(theta) * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def _normalise(kernel: np.ndarray) -> np.ndarray:
    """Sum 1, so blurring keeps the image's brightness."""
    return kernel / kernel.sum()


def _pad(kernel: np.ndarray, pad_to: int) -> np.ndarray:
    """Zero-pad to pad_to x pad_to so every kernel of a draw has one shape."""
    p = max(pad_to - kernel.shape[0], 0) // 2
    return np.pad(kernel, p)


def anisotropic_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """exp(-x^T Sigma^-1 x / 2): a Gaussian blur stretched along an axis rotated by theta (motion/defocus-like)."""
    return _normalise(np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta)))


def isotropic_gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    """exp(-r^2 / (2 sigma^2)): the plain round Gaussian blur."""
    return anisotropic_gaussian_kernel(size, sigma, sigma, 0.0)


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """exp(-(x^T Sigma^-1 x)^beta / 2): beta < 1 gives heavier tails, beta > 1 a flatter top than a Gaussian."""
    return _normalise(np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta) ** beta))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """1 / ((x^T Sigma^-1 x)^beta + 1): a flat-topped blur with slowly decaying tails."""
    return _normalise(1.0 / (_quadratic_form(size, sigma_x, sigma_y, theta) ** beta + 1.0))


def sinc_kernel(size: int, cutoff: float, pad_to: int = 0) -> np.ndarray:
    """basicsr's circular_lowpass_kernel: an ideal round low-pass (2D sinc), which causes ringing and overshoot.

    cutoff * J1(cutoff * r) / (2 pi r), whose limit at r = 0 is cutoff^2 / (4 pi).
    """
    ax = np.arange(size) - (size - 1) / 2
    r = np.hypot(*np.meshgrid(ax, ax))
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    kernel[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
    return _pad(_normalise(kernel), pad_to)


@dataclass
class SampledKernel:
    """One random kernel: its type, size and parameters (for inspection), and the 21 x 21 kernel itself."""

    kind: str  # one of KERNEL_TYPES, "sinc" or "pulse" (identity)
    size: int
    params: dict[str, float]
    kernel: np.ndarray


def _draw_beta(rng: np.random.Generator, lo: float, hi: float) -> float:
    """basicsr's beta draw: half the time below 1 (heavy tails), half above (flat top), whatever the range's widths."""
    return rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi)


def random_kernel(rng: np.random.Generator | int, config: DegradationConfig, stage: int) -> SampledKernel:
    """The blur kernel of degradation stage 1 or 2: a sinc with probability sinc_prob, else a mixed Gaussian-family kernel."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, not {stage}")
    rng = np.random.default_rng(rng)
    sigma_range, sinc_prob = (config.blur_sigma, config.sinc_prob) if stage == 1 else (config.blur_sigma2, config.sinc_prob2)
    size = int(rng.choice(config.kernel_sizes))
    if rng.random() < sinc_prob:
        # small kernels cannot represent a very low cutoff, so they get a narrower range
        cutoff = rng.uniform(math.pi / 3 if size < 13 else math.pi / 5, math.pi)
        return SampledKernel("sinc", size, {"cutoff": cutoff}, sinc_kernel(size, cutoff, pad_to=KERNEL_PAD_TO))

    kind = config.kernel_types[rng.choice(len(config.kernel_types), p=config.kernel_probs)]
    anisotropic = kind.endswith("aniso")
    sigma_x = rng.uniform(*sigma_range)
    sigma_y = rng.uniform(*sigma_range) if anisotropic else sigma_x
    theta = rng.uniform(-math.pi, math.pi) if anisotropic else 0.0
    params = {"sigma_x": sigma_x, "sigma_y": sigma_y, "theta": theta}
    if kind.startswith("generalized"):
        params["beta"] = _draw_beta(rng, *config.betag_range)
        kernel = generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, params["beta"])
    elif kind.startswith("plateau"):
        params["beta"] = _draw_beta(rng, *config.betap_range)
        kernel = plateau_kernel(size, sigma_x, sigma_y, theta, params["beta"])
    else:
        kernel = anisotropic_gaussian_kernel(size, sigma_x, sigma_y, theta)
    return SampledKernel(kind, size, params, _pad(kernel, KERNEL_PAD_TO))


def _final_kernel(rng: np.random.Generator, config: DegradationConfig) -> SampledKernel:
    """The sinc applied with the last resize (ringing at the output size), or an identity kernel."""
    if rng.random() < config.final_sinc_prob:
        size = int(rng.choice(config.kernel_sizes))
        cutoff = rng.uniform(math.pi / 3, math.pi)
        return SampledKernel("sinc", size, {"cutoff": cutoff}, sinc_kernel(size, cutoff, pad_to=KERNEL_PAD_TO))
    pulse = np.zeros((KERNEL_PAD_TO, KERNEL_PAD_TO))
    pulse[KERNEL_PAD_TO // 2, KERNEL_PAD_TO // 2] = 1.0
    return SampledKernel("pulse", 1, {}, pulse)


# ----------------------------------------------------------------------------------------------- image operations


def _reflect_pad(img: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect padding (as basicsr's filter2D) that also works on images smaller than the pad, e.g. after a 0.15x resize."""
    while pad > 0:
        step = min(pad, img.shape[-2] - 1, img.shape[-1] - 1)
        if step == 0:  # a 1-pixel image has nothing to reflect
            return F.pad(img, (pad,) * 4, mode="replicate")
        img = F.pad(img, (step,) * 4, mode="reflect")
        pad -= step
    return img


def _depthwise(planes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Correlate every plane of a (1, N, H, W) stack with one kernel, as a grouped conv (the fastest form on CPU)."""
    n = planes.shape[1]
    return F.conv2d(planes, weight.expand(n, 1, -1, -1), groups=n)


def filter2d(img: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """Blur each channel of a (..., H, W) image with one odd-sized kernel; reflect borders (basicsr's filter2D)
    so edges don't darken."""
    k = kernel.shape[-1]
    weight = torch.as_tensor(kernel, dtype=img.dtype).view(1, 1, k, k)
    padded = _reflect_pad(img.reshape(1, -1, *img.shape[-2:]), k // 2)
    return _depthwise(padded, weight).reshape(img.shape)


def _separable_filter(img: torch.Tensor, g: np.ndarray) -> torch.Tensor:
    """filter2d with the kernel outer(g, g), done as two 1D passes: same result, much faster for USM's 51 x 51."""
    k = len(g)
    g = torch.as_tensor(g, dtype=img.dtype)
    padded = _reflect_pad(img.reshape(1, -1, *img.shape[-2:]), k // 2)
    return _depthwise(_depthwise(padded, g.view(1, 1, 1, k)), g.view(1, 1, k, 1)).reshape(img.shape)


def _opencv_gaussian(size: int) -> np.ndarray:
    """cv2.getGaussianKernel(size, 0): OpenCV picks sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()


_USM_GAUSSIAN = _opencv_gaussian(51)  # basicsr USMSharp(radius=50): the radius is made odd


def usm_sharp(img: torch.Tensor, weight: float = 0.5, threshold: float = 10) -> torch.Tensor:
    """basicsr's USMSharp: unsharp-mask the GT so the model learns crisper output than the (soft) photos.

    Only where the high-pass residual exceeds threshold (in 8-bit levels), with a blurred mask so the sharpened
    regions blend in.
    """
    residual = img - _separable_filter(img, _USM_GAUSSIAN)
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft_mask = _separable_filter(mask, _USM_GAUSSIAN)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


def _resize(img: torch.Tensor, mode: str, **target) -> torch.Tensor:
    """F.interpolate a (C, H, W) image to size= or by scale_factor=; clamped because bicubic overshoots."""
    align = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(img[None], mode=mode, **target, **align)[0].clamp(0, 1)


def poisson_noise(img: torch.Tensor, gray: bool, rng: np.random.Generator) -> torch.Tensor:
    """basicsr's generate_poisson_noise_pt (at scale 1): shot noise at a photon count set by the image's tonal range.

    The count is 2^ceil(log2(number of distinct 8-bit values)); gray noise is computed on the luma and shared
    by the three channels.
    """
    if gray:
        img = (img * torch.tensor(LUMA, dtype=img.dtype).view(3, 1, 1)).sum(0, keepdim=True)
    img = (img * 255).round().clamp(0, 255) / 255
    vals = 2 ** math.ceil(math.log2(len(torch.unique(img))))
    counts = rng.poisson(img.double().numpy() * vals)
    return torch.from_numpy(counts).to(img.dtype) / vals - img


def _add_noise(img: torch.Tensor, noise: dict, rng: np.random.Generator) -> torch.Tensor:
    """Gaussian or Poisson noise as drawn in sample_params; gray noise is one plane added to all channels."""
    if noise["type"] == "gaussian":
        shape = (1, *img.shape[1:]) if noise["gray"] else img.shape
        n = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) * (noise["sigma"] / 255)
    else:
        n = poisson_noise(img, noise["gray"], rng) * noise["scale"]
    return (img + n).clamp(0, 1)


def jpeg(img: torch.Tensor, quality: float) -> torch.Tensor:
    """JPEG-compress a (3, H, W) image in memory with Pillow at the rounded quality."""
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=round(quality))
    buf.seek(0)
    decoded = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------- pipeline


def _draw_resize(rng: np.random.Generator, probs, scale_range) -> dict:
    """Up, down or keep (with probs), then a scale on that side of 1 and an interpolation mode."""
    kind = RESIZE_TYPES[rng.choice(3, p=probs)]
    if kind == "up":
        scale = rng.uniform(1.0, scale_range[1])
    elif kind == "down":
        scale = rng.uniform(scale_range[0], 1.0)
    else:
        scale = 1.0
    return {"type": kind, "scale": scale, "mode": RESIZE_MODES[rng.integers(3)]}


def _draw_noise(rng: np.random.Generator, gaussian_prob, sigma_range, poisson_range, gray_prob) -> dict:
    """Gaussian (sigma in 8-bit levels) or Poisson (scale) noise, gray (same on all channels) with gray_prob."""
    if rng.random() < gaussian_prob:
        noise = {"type": "gaussian", "sigma": rng.uniform(*sigma_range)}
    else:
        noise = {"type": "poisson", "scale": rng.uniform(*poisson_range)}
    noise["gray"] = bool(rng.random() < gray_prob)
    return noise


@dataclass
class DegradedPair:
    """gt: the USM-sharpened (and maybe flipped) crop; lq: its degraded 1/scale version on 8-bit levels;
    lq_up: lq bicubic-upscaled back to the GT size. All (3, H, W) float32 in [0, 1]."""

    gt: torch.Tensor
    lq: torch.Tensor
    lq_up: torch.Tensor
    params: dict = field(repr=False)


class RealESRGANDegradation:
    """Real-ESRGAN's second-order degradation: blur, resize, noise, JPEG, twice, then resize to 1/scale with a sinc."""

    def __init__(self, config: DegradationConfig | None = None):
        self.config = config or DegradationConfig()

    def sample_params(self, rng: np.random.Generator | int) -> dict:
        """Every random choice of one pair except the noise pixels, which depend on the image size."""
        c, rng = self.config, np.random.default_rng(rng)
        return {
            "hflip": bool(rng.random() < c.hflip_prob),
            "kernel1": random_kernel(rng, c, 1),
            "resize1": _draw_resize(rng, c.resize_probs, c.resize_range),
            "noise1": _draw_noise(rng, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob),
            "jpeg1": rng.uniform(*c.jpeg_range),
            "blur2": bool(rng.random() < c.second_blur_prob),
            "kernel2": random_kernel(rng, c, 2),
            "resize2": _draw_resize(rng, c.resize_probs2, c.resize_range2),
            "noise2": _draw_noise(rng, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2),
            "resize_before_jpeg": bool(rng.random() < 0.5),
            "final_mode": RESIZE_MODES[rng.integers(3)],
            "final_kernel": _final_kernel(rng, c),
            "jpeg2": rng.uniform(*c.jpeg_range2),
        }

    def __call__(self, hr_crop: torch.Tensor, rng: np.random.Generator | int) -> DegradedPair:
        """Degrade one (3, H, W) crop in [0, 1]; H and W must be multiples of config.scale."""
        s, rng = self.config.scale, np.random.default_rng(rng)
        _, h, w = hr_crop.shape
        if h % s or w % s:
            raise ValueError(f"crop {w}x{h} is not a multiple of the scale {s}")
        p = self.sample_params(rng)
        gt = hr_crop.detach().cpu().float().clamp(0, 1)
        if p["hflip"]:
            gt = gt.flip(-1)
        gt = usm_sharp(gt)  # basicsr degrades the sharpened GT, not the photo

        out = filter2d(gt, p["kernel1"].kernel)
        out = _resize(out, p["resize1"]["mode"], scale_factor=p["resize1"]["scale"])
        out = _add_noise(out, p["noise1"], rng)
        out = jpeg(out, p["jpeg1"])

        if p["blur2"]:
            out = filter2d(out, p["kernel2"].kernel)
        r2 = p["resize2"]["scale"]
        out = _resize(out, p["resize2"]["mode"], size=(int(h / s * r2), int(w / s * r2)))
        out = _add_noise(out, p["noise2"], rng)
        final_size = (h // s, w // s)
        if p["resize_before_jpeg"]:
            out = filter2d(_resize(out, p["final_mode"], size=final_size), p["final_kernel"].kernel)
            out = jpeg(out, p["jpeg2"])
        else:
            out = jpeg(out, p["jpeg2"])
            out = filter2d(_resize(out, p["final_mode"], size=final_size), p["final_kernel"].kernel)

        lq = (out.clamp(0, 1) * 255).round() / 255
        return DegradedPair(gt=gt, lq=lq, lq_up=_resize(lq, "bicubic", size=(h, w)), params=p)


# ----------------------------------------------------------------------------------------------- folders


def random_crop(image: torch.Tensor, size: int, rng: np.random.Generator | int) -> torch.Tensor:
    """A random size x size window of a (C, H, W) photo; a photo smaller than that is first reflect-padded
    at the bottom/right, as basicsr does."""
    rng = np.random.default_rng(rng)
    _, h, w = image.shape
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h or pad_w:
        image = torch.from_numpy(np.pad(image.numpy(), ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect"))
    top = int(rng.integers(image.shape[1] - size + 1))
    left = int(rng.integers(image.shape[2] - size + 1))
    return image[:, top : top + size, left : left + size]


def _save_png(rgb: torch.Tensor, target: Path) -> None:
    """8-bit PNG written to NAME.png.part and renamed, so an interrupted run never leaves a half-written pair."""
    tmp = target.with_name(target.name + ".part")
    to_pil(rgb).save(tmp, format="PNG")
    tmp.replace(target)


def degrade_folder(
    hr_dir, out_dir, seed: int = 80, crop: int = 512, per_image: int = 1, progress: bool = True,
    config: DegradationConfig | None = None,
) -> int:
    """Write per_image degraded pairs of each photo in hr_dir as out_dir/gt/NAME_k.png and out_dir/lq/NAME_k.png.

    Each pair's generator is seeded from (seed, file name, k), so a pair doesn't depend on which other photos
    are in the folder. Unreadable photos are skipped with a warning. Returns the number of pairs written.
    """
    from tqdm import tqdm

    degrade = RealESRGANDegradation(config)
    out_dir = Path(out_dir)
    for sub in ("gt", "lq"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    written = 0
    photos = list_images([hr_dir])
    stems = [p.stem for p in photos]
    for path in tqdm(photos, desc="degrade", unit="photo", disable=not progress, file=sys.stderr):
        try:
            photo = load_image(path).rgb
        except ImageError as e:
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        for k in range(per_image):
            rng = np.random.default_rng([seed, k, *path.name.encode()])
            pair = degrade(random_crop(photo, crop, rng), rng)
            stem = path.stem if stems.count(path.stem) == 1 else path.name.replace(".", "_")  # a.jpg and a.png both kept
            name = f"{stem}_{k}.png"
            _save_png(pair.gt, out_dir / "gt" / name)
            _save_png(pair.lq, out_dir / "lq" / name)
            written += 1
    return written
