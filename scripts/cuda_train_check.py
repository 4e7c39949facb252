"""Paper-size training steps on a GPU with fp16 mixed precision (random weights, random pairs).

Checks what CPU CI cannot: the 2 B teacher + 12-block student + LoRA rank 64 fit and step under
accelerate's fp16 autocast at 512 px, and reports seconds per step and peak memory.
Usage on a GPU machine: `python scripts/cuda_train_check.py OUTDIR`.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL, SD3Transformer2DModel  # noqa: E402

from tinysr import TinyAutoencoder, TSDSRPipeline  # noqa: E402
from tinysr.bench import SD3_MEDIUM_TRANSFORMER, SD3_MEDIUM_VAE  # noqa: E402
from tinysr.convert import tinysr_transformer_from_sd3  # noqa: E402
from trainer.cli import main as trainer_main  # noqa: E402


def main(root: Path) -> None:
    torch.manual_seed(0)
    teacher = TSDSRPipeline(
        SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER), AutoencoderKL(**SD3_MEDIUM_VAE),
        torch.randn(333, 4096) * 0.1, torch.randn(2048) * 0.1, device="cpu",
    )
    teacher.save_pretrained(root / "teacher", dtype="fp16")
    run = root / "runs" / "paper-check"
    TinyAutoencoder().save_pretrained(run / "vae-decoder" / "final" / "vae")
    keep = [0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21]
    tinysr_transformer_from_sd3(teacher.transformer, teacher.pooled_embeds, keep).save_pretrained(run / "prune-export" / "final" / "transformer")
    rng = np.random.default_rng(0)
    for sub in ("gt", "lq"):
        (root / "pairs" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(4):
        gt = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
        gt.save(root / "pairs" / "gt" / f"{i}.png")
        gt.resize((128, 128), Image.BICUBIC).save(root / "pairs" / "lq" / f"{i}.png")
    stage = {"steps": 4, "batch_size": 2, "lora_rank": 64, "w_l1": 1.0, "lr": 1e-4, "log_every": 1}
    cfg = {
        "name": "paper-check", "output_dir": str(root / "runs"), "mixed_precision": "fp16", "teacher": str(root / "teacher"),
        "data": {"pairs": str(root / "pairs"), "crop": 512},
        "stages": {"distill-1": stage, "prune-search": {**stage, "steps": 3, "batch_size": 1}},
    }
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    for name in ("distill-1", "prune-search"):
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        assert trainer_main([name, "--config", str(root / "cfg.yaml")]) == 0
        rows = [json.loads(line) for line in (run / name / "log.jsonl").read_text().splitlines()]
        peak = torch.cuda.max_memory_allocated() / 2**30
        losses = ", ".join(f"{r['loss']:.4f}" for r in rows)
        print(f"PASS {name} fp16 on {torch.cuda.get_device_name()}: {len(rows)} steps in {time.perf_counter() - start:.1f}s "
              f"(last step {rows[-1]['time'] - rows[-2]['time']:.2f}s), peak {peak:.1f} GiB, losses {losses}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
