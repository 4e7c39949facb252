"""The training stages on tiny models: configs, losses that fall, checkpoints, resume, the demo chain."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tinysr import TinySRPipeline, TSDSRPipeline
from tinysr.convert import tinysr_transformer_from_sd3
from trainer.cli import main as trainer_main
from trainer.config import ConfigError, check, load_config

from .conftest import make_kl, make_sd3, random_image

ROOT = Path(__file__).resolve().parents[1]
TINY_STAGE = {"batch_size": 2, "lora_rank": 4, "log_every": 1}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny teacher folder, 6 degraded pairs (64 px GT) and a config running every stage for a few steps."""
    root = tmp_path_factory.mktemp("train")
    teacher = TSDSRPipeline(make_sd3(seed=9, num_layers=8), make_kl(seed=9), torch.randn(5, 32) * 0.1, torch.randn(24) * 0.1)
    teacher.save_pretrained(root / "teacher")
    for sub in ("gt", "lq"):
        (root / "pairs" / sub).mkdir(parents=True)
    for i in range(6):
        gt = (random_image(64, 64, seed=i).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(gt).save(root / "pairs" / "gt" / f"p{i}.png")
        Image.fromarray(gt).resize((16, 16), Image.BICUBIC).save(root / "pairs" / "lq" / f"p{i}.png")
    config = {
        "name": "tiny",
        "output_dir": str(root / "runs"),
        "teacher": str(root / "teacher"),
        "tiny_vae": {"channels": 8, "blocks_per_stage": 1},
        "data": {"pairs": str(root / "pairs"), "crop": 64},
        "stages": {
            "vae-encoder": {**TINY_STAGE, "steps": 12, "lr": 3e-3, "w_mse": 1.0},
            "vae-decoder": {**TINY_STAGE, "steps": 12, "lr": 3e-3, "w_lpips": 3.0, "w_gan": 1.0},
            "cache": {"batch_size": 2},
            "prune-search": {**TINY_STAGE, "steps": 3, "lr": 1e-3, "w_l1": 1.0, "w_lpips": 1.0},
            "prune-export": {},
            "distill-1": {**TINY_STAGE, "steps": 12, "lr": 1e-3, "w_l1": 1.0, "checkpoint_every": 4},
            "distill-2": {**TINY_STAGE, "steps": 4, "lr": 1e-4, "w_l1": 5.0, "w_lpips": 1.0, "w_gan": 0.3},
            "export": {},
        },
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


def log_rows(workspace, stage):
    return [json.loads(line) for line in (workspace / "runs" / "tiny" / stage / "log.jsonl").read_text().splitlines()]


def test_bad_configs_fail_fast(workspace, tmp_path):
    cfg = workspace / "tiny.yaml"
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="batchsize"):
        load_config(cfg, ["stages.distill-1.batchsize=3"])
    with pytest.raises(ConfigError, match="steps"):
        load_config(cfg, ["stages.distill-1.steps=many"])
    with pytest.raises(ConfigError, match="perceptual"):
        check(load_config(cfg, ["stages.distill-2.perceptual=ssim"]), ["distill-2"])
    with pytest.raises(ConfigError, match="gt/ and lq/"):
        check(load_config(cfg, [f"data.pairs={tmp_path}"]), ["distill-1"])
    partial = yaml.safe_load(cfg.read_text())
    del partial["stages"]["distill-1"]
    (tmp_path / "partial.yaml").write_text(yaml.safe_dump(partial))
    with pytest.raises(ConfigError, match="no `stages.distill-1`"):
        check(load_config(tmp_path / "partial.yaml"), ["distill-1"])
    assert trainer_main(["distill-1", "--config", str(cfg), "stages.distill-1.lr=-1"]) == 2


def test_vae_stages_reduce_their_losses(workspace):
    cfg = str(workspace / "tiny.yaml")
    assert trainer_main(["vae-encoder", "--config", cfg]) == 0
    assert trainer_main(["vae-decoder", "--config", cfg]) == 0
    enc = [r["loss"] for r in log_rows(workspace, "vae-encoder")]
    assert len(enc) == 12 and np.mean(enc[-3:]) < np.mean(enc[:3])
    dec = [r["lpips"] for r in log_rows(workspace, "vae-decoder")]
    assert "gan_d" in log_rows(workspace, "vae-decoder")[-1]
    assert np.mean(dec[-3:]) < np.mean(dec[:3])
    assert (workspace / "runs" / "tiny" / "vae-decoder" / "final" / "vae" / "config.json").is_file()


def write_pruned_student(workspace, keep=(0, 2, 5, 7)):
    """What prune-export leaves behind, made directly (the pruning stages have their own tests)."""
    teacher = TSDSRPipeline.from_pretrained(workspace / "teacher")
    student = tinysr_transformer_from_sd3(teacher.transformer, teacher.pooled_embeds, list(keep))
    student.save_pretrained(workspace / "runs" / "tiny" / "prune-export" / "final" / "transformer")


def test_distill_stages_and_export(workspace):
    cfg = str(workspace / "tiny.yaml")
    if not (workspace / "runs" / "tiny" / "vae-decoder" / "final").is_dir():
        test_vae_stages_reduce_their_losses(workspace)
    write_pruned_student(workspace)
    assert trainer_main(["cache", "--config", cfg]) == 0
    assert trainer_main(["distill-1", "--config", cfg]) == 0
    l1 = [r["l1"] for r in log_rows(workspace, "distill-1")]
    assert np.mean(l1[-3:]) < np.mean(l1[:3])
    ckpts = sorted(p.name for p in (workspace / "runs" / "tiny" / "distill-1" / "checkpoints").iterdir())
    assert ckpts == ["step-0000004", "step-0000008", "step-0000012"]
    assert trainer_main(["distill-2", "--config", cfg]) == 0
    assert {"l1", "lpips", "gan_g", "gan_d"} <= set(log_rows(workspace, "distill-2")[-1])
    assert trainer_main(["export", "--config", cfg]) == 0
    pipe = TinySRPipeline.from_pretrained(workspace / "runs" / "tiny" / "export")
    assert len(pipe.transformer.transformer_blocks) == 4
    assert pipe(random_image(16, 16)).image.shape == (3, 64, 64)
