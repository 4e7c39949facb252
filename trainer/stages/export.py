"""`cache` and `export`: the teacher's latents for training, and the final TinySR folder."""

import json

from tinysr.latent_cache import build_latent_cache
from tinysr.pipelines import TinySRPipeline

from ..common import final_dir, load_distilled_student, load_teacher, load_tiny_vae
from ..config import tiny_vae_stage
from ..run import stage_dir


def run_cache(cfg, stage: str, resume: str | None = None):
    """Resumable by construction: complete shards are kept and skipped."""
    import torch
    from accelerate import PartialState

    teacher = load_teacher(cfg, PartialState().device)
    out = stage_dir(cfg, "cache") if not cfg.data.cache else cfg.data.cache
    build_latent_cache(teacher, cfg.data.pairs, out, shard_size=cfg.stages[stage].batch_size * 64, dtype=torch.float16)
    return out


def run_export(cfg, stage: str, resume: str | None = None):
    """distill-2's student (LoRA merged) + the tiny VAE (decoder-tune's where configured, else vae-decoder's) -> a folder TinySRPipeline loads."""
    pipe = TinySRPipeline(load_distilled_student(cfg), load_tiny_vae(cfg, tiny_vae_stage(cfg)), device="cpu", remove_token_pattern=cfg.remove_token_pattern)
    out = stage_dir(cfg, stage)
    pipe.save_pretrained(out)
    decision = final_dir(cfg, "prune-export") / "decision.json"
    if decision.is_file():
        (out / "pruning.json").write_text(decision.read_text())
    (out / "training.json").write_text(json.dumps({"run": cfg.name, "teacher": cfg.teacher}, indent=2) + "\n")
    return out
