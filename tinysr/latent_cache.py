"""Pre-encoded training latents (paper A.1): LQ, HQ and teacher-output latents in safetensors shards.

Layout: `index.json` (config + one entry per complete shard) and `shard-NNNNN.safetensors`
holding `lq`, `hq`, `teacher` (N, 16, h, w) in the latent space the transformer sees (already
multiplied by the VAE's scaling factor). Shards and the index are written atomically, so an
interrupted run resumes after the last complete shard.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ImageError, WrongModelError
from .imageio import list_images, load_image
from .pipelines.base import vae_encode

INDEX = "index.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def paired_images(pairs_dir: Path) -> list[tuple[str, Path, Path]]:
    """(name, lq, gt) for every `lq/NAME` with a `gt/NAME` beside it (the layout `tinysr degrade` writes)."""
    lq = {p.name: p for p in list_images([pairs_dir / "lq"])} if (pairs_dir / "lq").is_dir() else {}
    gt = {p.name: p for p in list_images([pairs_dir / "gt"])} if (pairs_dir / "gt").is_dir() else {}
    names = sorted(set(lq) & set(gt))
    if not names:
        raise ImageError(f"{pairs_dir} holds no lq/ and gt/ images with matching names")
    return [(n, lq[n], gt[n]) for n in names]


@torch.no_grad()
def encode_pair(pipe, lq_path: Path, gt_path: Path, scale: int = 4) -> dict[str, torch.Tensor]:
    """Latents of one pair: E(bicubic-upscaled LQ), E(GT) and the teacher's one-step output z - eps(z)."""
    gt = load_image(gt_path).rgb[None]
    lq = load_image(lq_path).rgb[None]
    if tuple(gt.shape[-2:]) != (lq.shape[-2] * scale, lq.shape[-1] * scale):
        raise ImageError(f"{lq_path.name}: GT {tuple(gt.shape[-2:])} is not {scale}x LQ {tuple(lq.shape[-2:])}")
    lq_up = F.interpolate(lq, size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    s = pipe.vae.config.scaling_factor
    to = dict(device=pipe.device, dtype=pipe.dtype)
    z_lq = vae_encode(pipe.vae, (lq_up * 2 - 1).to(**to)) * s
    z_hq = vae_encode(pipe.vae, (gt * 2 - 1).to(**to)) * s
    z_teacher = z_lq - pipe.predict_tiled(z_lq)
    return {"lq": z_lq[0], "hq": z_hq[0], "teacher": z_teacher[0]}


def build_latent_cache(pipe, pairs_dir, out_dir, shard_size: int = 256, dtype=torch.float16, progress: bool = True) -> dict:
    """Encode every pair not yet in a complete shard; returns the index."""
    from tqdm import tqdm

    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = paired_images(pairs_dir)
    index_path = out_dir / INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else {
        "pairs_dir": str(pairs_dir.resolve()),
        **teacher_settings(pipe),
        "dtype": str(dtype).removeprefix("torch."),
        "shards": [],
    }
    check_teacher_settings(index, pipe, index_path)
    done = {name for shard in index["shards"] for name in shard["names"]}
    todo = [p for p in pairs if p[0] not in done]
    buffer: dict[str, list] = {"names": [], "lq": [], "hq": [], "teacher": []}

    def flush():
        if not buffer["names"]:
            return
        file = f"shard-{len(index['shards']):05d}.safetensors"
        tensors = {k: torch.stack(buffer[k]).to(dtype).cpu().contiguous() for k in ("lq", "hq", "teacher")}
        tmp = out_dir / (file + ".part")
        save_file(tensors, tmp)
        os.replace(tmp, out_dir / file)
        index["shards"].append({"file": file, "names": list(buffer["names"])})
        _atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
        for v in buffer.values():
            v.clear()

    for name, lq_path, gt_path in tqdm(todo, desc="latents", unit="pair", disable=not progress, file=sys.stderr):
        latents = encode_pair(pipe, lq_path, gt_path)
        buffer["names"].append(name)
        for k, v in latents.items():
            buffer[k].append(v)
        if len(buffer["names"]) >= shard_size:
            flush()
    flush()
    if not index_path.is_file():
        _atomic_write_text(index_path, json.dumps(index, indent=1) + "\n")
    return index


def teacher_settings(pipe) -> dict:
    """What the cached teacher latents depend on besides the weights: resuming or reading with others mixes two teachers."""
    return {"scaling_factor": pipe.vae.config.scaling_factor, "remove_token_pattern": pipe.remove_token_pattern}


def check_teacher_settings(index: dict, pipe, where: Path) -> None:
    cached = {"scaling_factor": index.get("scaling_factor"), "remove_token_pattern": index.get("remove_token_pattern", False)}
    teacher = teacher_settings(pipe)
    if cached != teacher:
        raise WrongModelError(f"{where}: the latents were cached by a teacher with {cached}, not {teacher}; delete the cache to rebuild it")


class LatentCacheDataset(torch.utils.data.Dataset):
    """Items `{"name", "lq", "hq", "teacher", "lq_path", "gt_path"}` read lazily from the shards."""

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        if not (self.dir / INDEX).is_file():
            raise FileNotFoundError(f"no {INDEX} in {self.dir}; build it with `python -m tinysr cache`")
        self.index = json.loads((self.dir / INDEX).read_text())
        self.items = [(s["file"], i, name) for s in self.index["shards"] for i, name in enumerate(s["names"])]
        pairs = Path(self.index["pairs_dir"])
        self.paths = {"lq_path": pairs / "lq", "gt_path": pairs / "gt"}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        file, row, name = self.items[i]
        with safe_open(self.dir / file, "pt") as f:
            item = {k: f.get_slice(k)[row].float() for k in ("lq", "hq", "teacher")}
        item["name"] = name
        item.update({k: str(folder / name) for k, folder in self.paths.items()})
        return item
