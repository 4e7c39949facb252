"""CUDA checks that CPU CI cannot make: GPU vs CPU agreement, fp16/bf16 paths, the fp16 fallback.

Run on a GPU machine: `python scripts/cuda_check.py`; exits non-zero on the first failed check.
"""

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinysr import TinyAutoencoder, TinySRPipeline, TinySRTransformer  # noqa: E402
from tinysr.bench import build_pipelines  # noqa: E402
from tinysr.device import PeakMemory  # noqa: E402


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        sys.exit(1)


def measured_run(pipe, image, **options):
    """The pipeline's result and its CUDA peak (through PeakMemory: the tiler's own measurement resets the raw counter)."""
    with PeakMemory("cuda") as memory:
        result = pipe(image, **options)
    return result, memory


def describe(result, memory) -> str:
    return f"[{result.dtype}] peak {memory.peak_bytes / 2**30:.2f} GiB, {result.timings['total']:.3f}s"


def tiny(seed=0):
    torch.manual_seed(seed)
    t = TinySRTransformer(sample_size=32, num_layers=2, attention_head_dim=32, num_attention_heads=4, pos_embed_max_size=64)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return t, TinyAutoencoder(channels=32)


def main():
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    img = torch.rand(3, 96, 136)
    t, v = tiny()
    cpu = TinySRPipeline(t, v, device="cpu")(img, color_fix="none").image
    gpu = TinySRPipeline(t, v, device="cuda")(img, color_fix="none").image
    check("cuda fp32 matches cpu", (gpu - cpu).abs().max() < 1e-3, f"max diff {(gpu - cpu).abs().max():.2e}")
    for dtype in ("fp16", "bf16"):
        r = TinySRPipeline(t, v, device="cuda", dtype=dtype)(img, color_fix="none")
        diff = (r.image - cpu).abs().mean()
        check(f"cuda {dtype} close to fp32", r.dtype == dtype and diff < 0.02, f"mean diff {diff:.2e}")
    with torch.no_grad():
        t.pos_embed.proj.bias.fill_(7e4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = TinySRPipeline(t, v, device="cuda", dtype="fp16")(img)
    check("fp16 overflow falls back", r.dtype in ("bf16", "fp32") and bool(torch.isfinite(r.image).all()) and caught, f"-> {r.dtype}")

    pipes = build_pipelines("paper", "cuda")
    for name, pipe in pipes.items():
        pipe.to(dtype="fp16")
        r, memory = measured_run(pipe, torch.rand(3, 128, 128))
        check(f"paper-size {name} fp16 128->512", r.image.shape == (3, 512, 512), describe(r, memory))
        big, options = torch.rand(3, 384, 320), dict(tile_size=64, tile_overlap=8, vae_tile_size=64, vae_tile_overlap=8)
        r, memory = measured_run(pipe, big, **options)
        check(f"paper-size {name} fp16 tiled 384x320", r.image.shape == (3, 1536, 1280), describe(r, memory))
        pipe.tile_memory_budget = lambda: 1  # room for no batch: the tiles one at a time
        one, single = measured_run(pipe, big, **options)
        del pipe.tile_memory_budget
        diff = (one.image - r.image).abs().max()
        check(f"paper-size {name} tiles one at a time match batches, in less memory", diff < 0.02 and single.peak_bytes <= memory.peak_bytes,
              f"max diff {diff:.2e}, {describe(one, single)}")
        del pipe
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
