"""The training stages on tiny models: configs, losses that fall, checkpoints, resume, the demo chain."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from tinysr import TinySRPipeline, TinySRTransformer, TSDSRPipeline
from tinysr.imageio import load_image
from tinysr.models import PatchAutoencoder
from trainer.cli import main as trainer_main
from trainer.common import load_tiny_vae, new_tiny_vae
from trainer.config import ConfigError, check, load_config
from trainer.provenance import record_differences

from .conftest import make_kl, make_sd3, make_student, random_image

ROOT = Path(__file__).resolve().parents[1]
TINY_STAGE = {"batch_size": 2, "lora_rank": 4, "log_every": 1}
TEACHER_SCALING = 1.2  # not the tiny VAE's default (SD3's 1.5305): the chain must carry the teacher's over


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny teacher folder, 6 degraded pairs (64 px GT) and a config running every stage for a few steps."""
    root = tmp_path_factory.mktemp("train")
    vae = make_kl(seed=9)
    vae.register_to_config(scaling_factor=TEACHER_SCALING)
    teacher = TSDSRPipeline(make_sd3(seed=9, num_layers=8), vae, torch.randn(5, 32) * 0.1, torch.randn(24) * 0.1)
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
            "prune-search": {**TINY_STAGE, "steps": 6, "lr": 1e-3, "w_l1": 1.0, "w_lpips": 1.0},
            "prune-export": {},
            "distill-1": {**TINY_STAGE, "steps": 12, "lr": 1e-3, "w_l1": 1.0, "checkpoint_every": 4},
            "distill-2": {**TINY_STAGE, "steps": 4, "lr": 1e-4, "w_l1": 5.0, "w_lpips": 1.0, "w_gan": 0.3, "lattice_period": 8},
            "decoder-tune": {**TINY_STAGE, "steps": 6, "lr": 3e-3, "w_l1": 1.0, "w_lpips": 1.0, "lattice_period": 8, "upsample_mode": "bilinear"},
            "export": {},
            "token-prune": {},
        },
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(config))
    return root


def log_rows(workspace, stage, name="tiny"):
    return [json.loads(line) for line in (workspace / "runs" / name / stage / "log.jsonl").read_text().splitlines()]


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
    with pytest.raises(ConfigError, match="vae_class"):
        base_vae = ["standins.vae_class=VQModel", "standins.vae={channels: 8}", "stages.demo-base-vae={steps: 1}"]
        check(load_config(cfg, base_vae), ["demo-base-vae"])
    with pytest.raises(ConfigError, match="unknown tracker"):
        check(load_config(cfg, ["report_to=[tensorboard,mlflow]"]), ["distill-1"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="wandb is not installed"):
            check(load_config(cfg, ["report_to=[wandb]"]), ["distill-1"])
    assert trainer_main(["distill-1", "--config", str(cfg), "stages.distill-1.lr=-1"]) == 2
    with pytest.raises(ConfigError, match="constant has no warm-up"):
        check(load_config(cfg, ["stages.distill-1.lr_warmup_steps=10"]), ["distill-1"])
    with pytest.raises(ConfigError, match="lattice_period must be 0 .off. or divide 32"):
        check(load_config(cfg, ["stages.distill-2.lattice_period=12"]), ["distill-2"])
    with pytest.raises(ConfigError, match="teacher_lattice_period must be 0"):
        check(load_config(cfg, ["stages.distill-1.teacher_lattice_period=3"]), ["distill-1"])
    with pytest.raises(ConfigError, match="disc_condition needs discriminator: dino-projected"):
        check(load_config(cfg, ["stages.distill-2.disc_condition=dinov2-cls"]), ["distill-2"])
    with pytest.raises(ConfigError, match="tiny_vae.padding_mode must be one of"):
        check(load_config(cfg, ["tiny_vae.padding_mode=mirror"]), ["vae-encoder"])
    with pytest.raises(ConfigError, match="tiny_vae.upsample_mode must be one of nearest, bilinear"):
        check(load_config(cfg, ["tiny_vae.upsample_mode=bicubic"]), ["vae-encoder"])
    with pytest.raises(ConfigError, match="tiny_vae.encoder_type must be one of taesd, patch"):
        check(load_config(cfg, ["tiny_vae.encoder_type=conv"]), ["vae-encoder"])
    for override, message in [
        ("stages.decoder-tune.upsample_mode=bicubic", "decoder-tune.upsample_mode must be empty .as trained. or one of nearest, bilinear"),
        ("stages.decoder-tune.padding_mode=replicate", "padding_mode would change the TAESD encoder's padding too"),
        ("tiny_vae_class=PatchAutoencoder", "switch a TinyAutoencoder's decoder, not a PatchAutoencoder's"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check(load_config(cfg, [override]), ["decoder-tune"])


# every stage on a fixed batch so its loss must fall; the token-pattern removal as the bundled demo's config
CHAIN_OVERRIDES = [
    *(f"stages.{st}.overfit_batch=true" for st in ("vae-encoder", "vae-decoder", "prune-search", "distill-1", "distill-2", "decoder-tune")),
    "remove_token_pattern=true",
]


@pytest.fixture(scope="module")
def chain(workspace):
    """`python -m trainer all` on the tiny config, every stage on a fixed batch so its loss must fall."""
    start = time.perf_counter()
    assert trainer_main(["all", "--config", str(workspace / "tiny.yaml"), *CHAIN_OVERRIDES]) == 0
    return time.perf_counter() - start


def falls(values, n=3):
    return np.mean(values[-n:]) < np.mean(values[:n])


def test_demo_chain_end_to_end(workspace, chain):
    run = workspace / "runs" / "tiny"
    assert falls([r["loss"] for r in log_rows(workspace, "vae-encoder")])
    assert falls([r["lpips"] for r in log_rows(workspace, "vae-decoder")])
    assert "gan_d" in log_rows(workspace, "vae-decoder")[-1]
    assert (run / "cache" / "index.json").is_file()
    assert falls([r["loss"] for r in log_rows(workspace, "prune-search")], n=2)
    decision = json.loads((run / "prune-search" / "final" / "decision.json").read_text())
    assert len(decision["kept_blocks"]) == 4
    assert falls([r["l1"] for r in log_rows(workspace, "distill-1")])
    assert sorted(p.name for p in (run / "distill-1" / "checkpoints").iterdir()) == ["step-0000004", "step-0000008", "step-0000012"]
    assert {"l1", "lpips", "gan_g", "gan_d"} <= set(log_rows(workspace, "distill-2")[-1])
    assert falls([r["l1"] for r in log_rows(workspace, "distill-2")], n=2)  # the adversarial terms need not fall
    pipe = TinySRPipeline.from_pretrained(run / "export")
    assert [len(pipe.transformer.transformer_blocks)] == [len(decision["kept_blocks"])]
    assert json.loads((run / "export" / "pruning.json").read_text())["kept_blocks"] == decision["kept_blocks"]
    assert pipe(random_image(16, 16)).image.shape == (3, 64, 64)
    assert pipe.vae.config.scaling_factor == TEACHER_SCALING  # the student sees latents scaled as its teacher did
    assert pipe.remove_token_pattern  # written by export from the config
    # decoder-tune ran after distill-2 and export shipped its VAE: the decoder switched to bilinear and retrained, the encoder kept
    assert falls([r["l1"] for r in log_rows(workspace, "decoder-tune")], n=2)
    assert pipe.vae.config.upsample_mode == "bilinear" and pipe.vae.config.padding_mode == "zeros"
    before = load_tiny_vae(load_config(workspace / "tiny.yaml")).state_dict()
    after = pipe.vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("encoder."))
    assert not torch.equal(after["decoder.layers.0.depthwise.weight"], before["decoder.layers.0.depthwise.weight"])
    other_teacher = SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.5305)))
    with pytest.raises(ConfigError, match="scaling_factor 1.2 is not the teacher VAE's 1.5305"):
        load_tiny_vae(load_config(workspace / "tiny.yaml"), teacher=other_teacher)


def copy_inputs(workspace, name):
    import shutil

    for stage in ("vae-decoder", "prune-export", "cache"):
        shutil.copytree(workspace / "runs" / "tiny" / stage, workspace / "runs" / name / stage, dirs_exist_ok=True)


def launch(args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_then_resume_matches_uninterrupted_run(workspace, chain):
    cfg = str(workspace / "tiny.yaml")
    common = ["stages.distill-1.steps=10", "stages.distill-1.checkpoint_every=3"]
    for name in ("whole", "killed"):
        copy_inputs(workspace, name)
    whole = launch(["distill-1", "--config", cfg, "name=whole", *common])
    assert whole.wait(timeout=600) == 0, whole.stdout.read()
    killed = launch(["distill-1", "--config", cfg, "name=killed", *common])
    ckpt = workspace / "runs" / "killed" / "distill-1" / "checkpoints" / "step-0000006"
    deadline = time.time() + 600
    while not ckpt.is_dir() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert ckpt.is_dir(), "the run ended before its second checkpoint"
    resumed = launch(["distill-1", "--config", cfg, "name=killed", "--resume", "latest", *common])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    curve = lambda name: [(r["step"], r["loss"]) for r in map(json.loads, (workspace / "runs" / name / "distill-1" / "log.jsonl").read_text().splitlines())]
    assert curve("killed") == curve("whole")
    assert [s for s, _ in curve("whole")] == list(range(1, 11))


def test_a_checkpoint_of_another_layout_is_refused_not_resumed_with_fresh_weights(workspace, chain, capsys):
    """Loading is not strict (frozen weights are not saved): a checkpoint naming tensors the model lacks must stop the run."""
    copy_inputs(workspace, "foreign")
    ckpt = workspace / "runs" / "foreign" / "distill-1" / "checkpoints" / "step-0000008"
    shutil.copytree(workspace / "runs" / "tiny" / "distill-1" / "checkpoints" / "step-0000008", ckpt)
    weights = load_file(ckpt / "model.safetensors")
    first = sorted(weights)[0]
    weights["renamed." + first] = weights.pop(first)
    save_file(weights, ckpt / "model.safetensors")
    assert trainer_main(["distill-1", "--config", str(workspace / "tiny.yaml"), "name=foreign", *CHAIN_OVERRIDES, "--resume", "latest"]) == 2
    assert f"holds weights this model does not have (1, e.g. renamed.{first})" in capsys.readouterr().err
    assert not (workspace / "runs" / "foreign" / "distill-1" / "final").exists()


def test_resume_refuses_a_checkpoint_of_other_settings_or_inputs(workspace, chain, capsys):
    """A checkpoint records its settings and inputs: resuming it after either changed would mix two trainings."""
    from scripts.train_demo_weights import replace_stale

    copy_inputs(workspace, "stale")
    stage = workspace / "runs" / "stale" / "distill-1"
    shutil.copytree(workspace / "runs" / "tiny" / "distill-1" / "checkpoints" / "step-0000008", stage / "checkpoints" / "step-0000008")
    resume = ["distill-1", "--config", str(workspace / "tiny.yaml"), "name=stale", *CHAIN_OVERRIDES, "--resume", "latest"]
    capsys.readouterr()
    for change, said in (("lr=0.002", "stages.distill-1.lr: 0.001 -> 0.002"), ("steps=14", "stages.distill-1.steps: 12 -> 14")):
        assert trainer_main([*resume, f"stages.distill-1.{change}"]) == 2
        err = capsys.readouterr().err
        assert said in err and "resuming would mix two trainings" in err
    vae = workspace / "runs" / "stale" / "vae-decoder" / "final" / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(vae).items()}, vae)
    assert trainer_main(resume) == 2
    assert "(vae-decoder output changed since)" in capsys.readouterr().err
    assert not (stage / "final").exists()
    # a checkpoint from before records were kept resumes unchecked
    state = stage / "checkpoints" / "step-0000008" / "trainer_state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "record"}))
    assert trainer_main(resume) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in log_rows(workspace, "distill-1", "stale")][-1] == 12
    # the retrain script keeps a stage of the same training and moves one of other settings aside, to train it afresh
    settings = [str(workspace / "tiny.yaml"), ["name=stale", *CHAIN_OVERRIDES]]
    replace_stale(load_config(*settings), "distill-1")
    assert (stage / "final").is_dir()
    replace_stale(load_config(settings[0], [*settings[1], "stages.distill-1.lr=0.002"]), "distill-1")
    assert not stage.exists() and (stage.with_name("distill-1.replaced") / "final").is_dir()
    assert "distill-1: trained afresh (stages.distill-1.lr: 0.001 -> 0.002)" in capsys.readouterr().out


def test_a_setting_added_since_a_checkpoint_counts_only_off_its_default():
    record = {"settings": {"seed": 80, "stage": {"lr": 1e-3, "w_l1": 1.0}}, "inputs": {"pairs": "abc"}}
    older = {"settings": {"seed": 80, "stage": {"lr": 1e-3}}, "inputs": {}}  # written before w_l1 and the inputs were recorded
    assert record_differences(older, {**record, "settings": {"seed": 80, "stage": {"lr": 1e-3, "w_l1": 0.0}}}, "distill-1") == []
    assert record_differences(older, record, "distill-1") == ["stages.distill-1.w_l1: (not recorded) -> 1.0"]
    assert record_differences(record, {**record, "inputs": {"pairs": "abd"}}, "distill-1") == ["pairs changed since"]
    two = {"settings": {"seed": 80, "num_processes": 2, "stage": {"lr": 1e-3}}, "inputs": {}}
    assert record_differences(older, {**two, "settings": {**two["settings"], "num_processes": 1}}, "distill-1") == []
    assert record_differences(older, two, "distill-1") == ["num_processes: (not recorded) -> 2"]


def test_accelerate_two_processes_on_cpu(workspace, chain):
    copy_inputs(workspace, "ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer", "distill-1", "--config", str(workspace / "tiny.yaml"),
           "name=ddp", "stages.distill-1.steps=3", "stages.distill-1.checkpoint_every=0"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in (workspace / "runs" / "ddp" / "distill-1" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert (workspace / "runs" / "ddp" / "distill-1" / "final" / "transformer" / "config.json").is_file()


def test_schedule_weight_decay_and_clip_follow_the_config(workspace, chain):
    """diffusers' cosine_with_restarts after a warm-up (counted in optimizer steps), AdamW's decay, the clip norm."""
    import math

    from trainer.run import TrainingRun

    copy_inputs(workspace, "sched")
    cfg = str(workspace / "tiny.yaml")
    s = ["steps=8", "grad_accum=2", "lr=1e-3", "lr_scheduler=cosine_with_restarts", "lr_warmup_steps=1", "lr_num_cycles=2",
         "weight_decay=0.05", "max_grad_norm=0.5"]
    assert trainer_main(["distill-1", "--config", cfg, "name=sched", *[f"stages.distill-1.{o}" for o in s]]) == 0
    lrs = [r["lr"] for r in log_rows(workspace, "distill-1", "sched")]
    updates = [step // 2 for step in range(1, 9)]  # updates done after each batch: one every second batch, 4 in all

    def expected(u):  # warm-up 1 update, then 2 hard-restart cosine cycles over the 3 left; 0 at the end
        progress = (u - 1) / 3
        return 1e-3 * (u / 1 if u < 1 else (0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((2 * progress) % 1)))))

    assert lrs == pytest.approx([expected(u) for u in updates], abs=1e-12)
    run = TrainingRun(load_config(cfg, ["name=probe", *[f"stages.distill-1.{o}" for o in s]]), "distill-1")
    weight = torch.nn.Parameter(torch.ones(2))
    opt, schedule = run.optimizer([weight])
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    clipped = {}
    run.accelerator.clip_grad_norm_ = lambda params, norm: clipped.setdefault("norm", norm)
    run.optimizer_step(weight.sum(), opt, [weight], schedule)
    assert clipped["norm"] == 0.5


def test_student_lora_targets_modulation_and_continued_lora(workspace, chain):
    """distill: the release's LoRA targets (patch embedding included), the folded modulation trains too, and
    distill-2 continues distill-1's LoRA on the prune-export base (or, with continue_lora false, merges it)."""
    from safetensors.torch import load_file

    from trainer.stages.distill import FULL_PARAMS, load_student

    cfg = load_config(workspace / "tiny.yaml")
    first = load_student(cfg, "distill-1", cfg.stages["distill-1"])
    trainable = {n for n, p in first.named_parameters() if p.requires_grad}
    assert any(n.startswith("pos_embed.proj.lora_A") for n in trainable) and any("ff.net.2.lora_B" in n for n in trainable)
    assert {"norm_out_modulation", "transformer_blocks.0.modulation"} <= trainable
    assert not any(n.endswith("attn.to_q.base_layer.weight") for n in trainable)

    run = workspace / "runs" / "tiny"
    second = load_student(cfg, "distill-2", cfg.stages["distill-2"])
    saved_lora = load_file(run / "distill-1" / "final" / "lora" / "pytorch_lora_weights.safetensors")
    lora = {n.replace(".default", ""): p for n, p in second.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved_lora) and all(torch.equal(lora[k], v) for k, v in saved_lora.items())
    full = load_file(run / "distill-1" / "final" / FULL_PARAMS)
    assert set(full) == {n for n in trainable if "lora_" not in n}
    assert all(torch.equal(second.get_parameter(k), v) for k, v in full.items())
    base = TinySRTransformer.from_pretrained(run / "prune-export" / "final" / "transformer")
    assert torch.equal(second.get_parameter("transformer_blocks.0.attn.to_q.base_layer.weight"), base.transformer_blocks[0].attn.to_q.weight)
    merged = TinySRTransformer.from_pretrained(run / "distill-1" / "final" / "transformer")
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert (second(x) - merged(x)).abs().max() < 1e-4  # the same function, kept apart
        merge_cfg = load_config(workspace / "tiny.yaml", ["stages.distill-2.continue_lora=false"])
        fresh = load_student(merge_cfg, "distill-2", merge_cfg.stages["distill-2"])
        assert (fresh(x) - merged(x)).abs().max() < 1e-5  # merged, plus a new LoRA whose B starts at 0
    assert torch.equal(fresh.transformer_blocks[0].attn.to_q.base_layer.weight, merged.transformer_blocks[0].attn.to_q.weight)


def test_distill_takes_the_teachers_token_grid_out_of_its_target(workspace, chain, monkeypatch):
    """teacher_lattice_period: an offset the teacher repeats in every token of a crop does not reach the student."""
    from trainer.stages import distill

    cfg = str(workspace / "tiny.yaml")
    common = ["stages.distill-1.steps=3", "stages.distill-1.checkpoint_every=0"]
    original = distill.TeacherLatents.__call__

    def with_grid(self, batch):
        z = original(self, batch)
        return z + torch.tensor([[1.0, -1.0], [-0.5, 0.5]]).repeat(z.shape[-2] // 2, z.shape[-1] // 2).to(z)

    for name, period, teacher in (("clean", 2, original), ("gridded", 2, with_grid), ("copied", 0, with_grid)):
        copy_inputs(workspace, name)
        monkeypatch.setattr(distill.TeacherLatents, "__call__", teacher)
        assert trainer_main(["distill-1", "--config", cfg, f"name={name}", *common, f"stages.distill-1.teacher_lattice_period={period}"]) == 0
    l1 = {name: [r["l1"] for r in log_rows(workspace, "distill-1", name)] for name in ("clean", "gridded", "copied")}
    assert l1["gridded"] == pytest.approx(l1["clean"], rel=1e-4)
    assert l1["copied"][0] > l1["clean"][0] + 0.1  # without it the grid is in the target


def test_distill_2_with_the_projected_dino_discriminator(workspace, chain, monkeypatch):
    """discriminator: dino-projected, conditioned on the GT's DINOv2 CLS (tiny random ViTs stand in for the weights)."""
    from timm.models.vision_transformer import VisionTransformer

    from trainer import discriminators

    def tiny_vit(name, **kwargs):
        patch = 14 if name == discriminators.DINOV2 else 16
        vit = VisionTransformer(img_size=kwargs.get("img_size", 224), patch_size=patch, embed_dim=16, depth=12, num_heads=2,
                                reg_tokens=4 if patch == 14 else 0)
        return vit.eval().requires_grad_(False)

    monkeypatch.setattr(discriminators, "pretrained_vit", tiny_vit)
    copy_inputs(workspace, "dino")
    shutil.copytree(workspace / "runs" / "tiny" / "distill-1", workspace / "runs" / "dino" / "distill-1", dirs_exist_ok=True)
    overrides = ["name=dino", "stages.distill-2.steps=2", "stages.distill-2.discriminator=dino-projected",
                 "stages.distill-2.disc_condition=dinov2-cls", "stages.distill-2.grad_accum=2", "stages.distill-2.lr_scheduler=linear"]
    assert trainer_main(["distill-2", "--config", str(workspace / "tiny.yaml"), *overrides]) == 0
    rows = log_rows(workspace, "distill-2", "dino")
    assert len(rows) == 2 and all(np.isfinite([r["gan_g"], r["gan_d"]]).all() for r in rows)
    assert rows[1]["lr"] != rows[0]["lr"]  # with grad_accum 2 the generator steps (and schedules) on the second batch
    from safetensors.torch import load_file

    state = load_file(workspace / "runs" / "dino" / "distill-2" / "checkpoints" / "step-0000002" / "model_1.safetensors")
    assert any(k.startswith("disc.heads.4.") for k in state) and not any(".backbone." in k or "condition." in k for k in state)


def test_token_prune_keeps_the_most_attended_prompt_tokens(workspace, tmp_path):
    cfg = str(workspace / "tiny.yaml")
    common = ["stages.token-prune.batch_size=2", "stages.token-prune.calibration_batches=2"]
    assert trainer_main(["token-prune", "--config", cfg, "stages.token-prune.token_keep=0.6", *common]) == 0
    out = workspace / "runs" / "tiny" / "token-prune" / "final"
    report = json.loads((out / "token_importance.json").read_text())
    importance = np.array(report["importance"])
    assert len(importance) == 5 and (importance > 0).all() and importance.sum() < 1  # a share of softmax mass
    assert report["kept_tokens"] == sorted(np.argsort(-importance)[:3].tolist())
    pruned, teacher = TSDSRPipeline.from_pretrained(out), TSDSRPipeline.from_pretrained(workspace / "teacher")
    assert torch.equal(pruned.prompt_embeds[0], teacher.prompt_embeds[0, report["kept_tokens"]])
    assert trainer_main(["token-prune", "--config", cfg, "stages.token-prune.token_keep=1.0", *common]) == 0
    assert torch.equal(TSDSRPipeline.from_pretrained(out).prompt_embeds, teacher.prompt_embeds)
    assert not TSDSRPipeline.from_pretrained(out).remove_token_pattern
    teacher.remove_token_pattern = True  # the pruned teacher keeps the teacher's token-pattern removal
    flagged = teacher.save_pretrained(tmp_path / "flagged-teacher")
    assert trainer_main(["token-prune", "--config", cfg, f"teacher={flagged}", "stages.token-prune.token_keep=1.0", *common]) == 0
    assert TSDSRPipeline.from_pretrained(out).remove_token_pattern


TINY_PATCH = {"latent_channels": 16, "patch_size": 4, "channels": 8, "blocks": 1}


def train_standins(cfg, vae_class, vae, steps, base_vae_loss, teacher_loss, extra=()):
    """demo-base-vae then demo-teacher on a fixed batch of 2, with the tiny SD3 transformer as the teacher."""
    from tests.conftest import TINY_SD3

    stage = {"lr": 3e-3, "steps": steps, "batch_size": 2, "log_every": 1, "overfit_batch": True}
    args = [
        *extra, f"standins.vae_class={vae_class}", f"standins.vae={json.dumps(vae)}",
        f"standins.transformer={json.dumps(TINY_SD3)}", "standins.prompt_tokens=3",
        f"stages.demo-base-vae={json.dumps({**stage, **base_vae_loss})}", f"stages.demo-teacher={json.dumps({**stage, **teacher_loss})}",
    ]
    for name in ("demo-base-vae", "demo-teacher"):
        assert trainer_main([name, "--config", cfg, *args]) == 0


@pytest.mark.parametrize("vae_class", ["AutoencoderKL", "PatchAutoencoder"])
def test_demo_standins_train_and_make_a_teacher_the_chain_loads(workspace, vae_class):
    """demo-base-vae + demo-teacher (the bundled weights' stand-ins for SD3's VAE and TSD-SR) on a fixed batch."""
    from tests.conftest import TINY_KL, TINY_SD3

    cfg = str(workspace / "tiny.yaml")
    vae = {**TINY_KL, "scaling_factor": 1.0} if vae_class == "AutoencoderKL" else TINY_PATCH
    extra = ["remove_token_pattern=true"] if vae_class == "PatchAutoencoder" else []
    train_standins(cfg, vae_class, vae, 10, {"w_l1": 1.0, "w_lpips": 0.5, "w_kl": 1e-6}, {"w_l1": 1.0, "w_lpips": 1.0, "w_gan": 0.1}, extra)
    assert falls([r["l1"] for r in log_rows(workspace, "demo-base-vae")])
    assert falls([r["loss"] for r in log_rows(workspace, "demo-teacher")])  # starts at the identity: l1 may rise
    vae_config = json.loads((workspace / "runs" / "tiny" / "demo-base-vae" / "final" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 1.0  # set from the latents' spread
    teacher = TSDSRPipeline.from_pretrained(workspace / "runs" / "tiny" / "demo-teacher" / "final")
    assert type(teacher.vae).__name__ == vae_class and teacher.remove_token_pattern == (vae_class == "PatchAutoencoder")
    assert teacher.prompt_embeds.shape == (1, 3, TINY_SD3["joint_attention_dim"])
    assert teacher(random_image(16, 16)).image.shape == (3, 64, 64)


def test_demo_teacher_tune_starts_from_the_teacher_and_trains_through_its_images(workspace):
    """demo-teacher-tune: demo-teacher's pipeline, fine-tuned with the image terms (local grid, cell steps, LPIPS)."""
    cfg = str(workspace / "tiny.yaml")
    extra = ["name=tune", "remove_token_pattern=true"]
    train_standins(cfg, "PatchAutoencoder", {**TINY_PATCH, "lapped": True}, 4, {"w_l1": 1.0}, {"w_l1": 1.0}, extra)
    tune = {"lr": 1e-6, "steps": 3, "batch_size": 2, "log_every": 1, "overfit_batch": True, "w_l1": 1.0, "w_lpips": 1.0,
            "lattice_period": 16, "lattice_window": 3, "w_lattice_l1": 10.0, "w_cell_steps": 5.0}
    assert trainer_main(["demo-teacher-tune", "--config", cfg, *extra, f"stages.demo-teacher-tune={json.dumps(tune)}"]) == 0
    rows = log_rows(workspace, "demo-teacher-tune", "tune")
    assert len(rows) == 3 and all({"l1", "lpips", "lattice_l1", "cell_steps"} <= r.keys() for r in rows)
    run = workspace / "runs" / "tune"
    teacher = TSDSRPipeline.from_pretrained(run / "demo-teacher" / "final")
    tuned = TSDSRPipeline.from_pretrained(run / "demo-teacher-tune" / "final")
    assert tuned.remove_token_pattern and torch.equal(tuned.prompt_embeds, teacher.prompt_embeds)
    assert all(torch.equal(v, tuned.vae.state_dict()[k]) for k, v in teacher.vae.state_dict().items())
    start, end = teacher.transformer.proj_out.weight, tuned.transformer.proj_out.weight
    assert start.abs().max() > 1e-3  # the teacher trained away from its identity start ...
    assert 0 < (end - start).abs().max() < 1e-4  # ... and the tune moved on from there, not from a fresh model
    for bad, message in (("lattice_window=4", "odd number of cells"), ("w_lattice_l1=1.0", "need a lattice_period")):
        with pytest.raises(ConfigError, match=message):
            check(load_config(cfg, [f"stages.demo-teacher-tune.{bad}"]), ["demo-teacher-tune"])


def test_demo_teacher_decoder_trains_a_pixel_refiner_alone_after_the_teachers_decoder(workspace, capsys):
    """demo-teacher-decoder: the published teacher unchanged but for a PixelRefiner after its VAE's synthesis, trained
    alone on the teacher's own predictions with the image terms (L1, LPIPS less the local grid, cell steps)."""
    cfg = str(workspace / "tiny.yaml")
    run = workspace / "runs" / "pixel"
    extra = ["name=pixel", "remove_token_pattern=true", f"teacher={run / 'demo-teacher' / 'final'}"]
    train_standins(cfg, "PatchAutoencoder", {**TINY_PATCH, "lapped": True}, 4, {"w_l1": 1.0}, {"w_l1": 1.0}, extra)
    vae_config = run / "demo-teacher" / "final" / "vae" / "config.json"  # as published before PixelRefiner existed (the bundled one)
    vae_config.write_text(json.dumps({k: v for k, v in json.loads(vae_config.read_text()).items() if not k.startswith("pixel_")}))
    stage = {"lr": 1e-3, "steps": 3, "batch_size": 2, "log_every": 1, "overfit_batch": True, "w_l1": 1.0, "w_lpips": 1.0,
             "lattice_period": 16, "lattice_window": 3, "w_lattice_l1": 10.0, "w_cell_steps": 5.0, "pixel_channels": 4}
    args = ["--config", cfg, *extra, f"stages.demo-teacher-decoder={json.dumps(stage)}"]
    assert trainer_main(["demo-teacher-decoder", *args]) == 0
    rows = log_rows(workspace, "demo-teacher-decoder", "pixel")
    assert len(rows) == 3 and all({"l1", "lpips", "lattice_l1", "cell_steps"} <= r.keys() for r in rows)
    teacher = TSDSRPipeline.from_pretrained(run / "demo-teacher" / "final")
    refined = TSDSRPipeline.from_pretrained(run / "demo-teacher-decoder" / "final")
    assert refined.remove_token_pattern and torch.equal(refined.prompt_embeds, teacher.prompt_embeds)
    assert all(torch.equal(v, refined.transformer.state_dict()[k]) for k, v in teacher.transformer.state_dict().items())
    vae = refined.vae.state_dict()
    assert all(torch.equal(v, vae[k]) for k, v in teacher.vae.state_dict().items())
    assert {k for k in vae if k not in teacher.vae.state_dict()} == {k for k in vae if k.startswith("decoder.pixel.")}
    assert refined.vae.config.pixel_channels == 4 and refined.vae.decoder.pixel.conv_out.weight.abs().max() > 0  # it trained
    z = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(refined.vae.decoder.synthesize(z), teacher.vae.decode(z))
        assert not torch.equal(refined.vae.decode(z), teacher.vae.decode(z))
    assert refined(random_image(16, 16)).image.shape == (3, 64, 64)
    capsys.readouterr()  # resuming with another refiner width: refused, not a size-mismatch traceback
    wider = ["demo-teacher-decoder", *args, "stages.demo-teacher-decoder.pixel_channels=6", "--resume", "latest"]
    assert trainer_main(wider) == 2
    assert "stages.demo-teacher-decoder.pixel_channels: 4 -> 6" in capsys.readouterr().err
    state = run / "demo-teacher-decoder" / "checkpoints" / "step-0000003" / "trainer_state.json"  # as written before records were kept
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "record"}))
    assert trainer_main(wider) == 2
    assert "holds weights of other shapes than this model's (7, e.g. blocks.0.0.bias)" in capsys.readouterr().err
    # a teacher that already has a refiner gets a new one in its place
    again = ["demo-teacher-decoder", *args, "name=pixel-again", f"teacher={run / 'demo-teacher-decoder' / 'final'}", "stages.demo-teacher-decoder.pixel_channels=6"]
    assert trainer_main(again) == 0
    vae = TSDSRPipeline.from_pretrained(workspace / "runs" / "pixel-again" / "demo-teacher-decoder" / "final").vae
    assert vae.decoder.pixel.conv_in.out_channels == 6 and torch.equal(vae.decoder.synthesis.weight, teacher.vae.decoder.synthesis.weight)
    capsys.readouterr()
    assert trainer_main(["demo-teacher-decoder", "--config", cfg, "name=pixel-kl", f"stages.demo-teacher-decoder={json.dumps(stage)}"]) == 2
    assert "adds a pixel refiner to a teacher whose VAE is a PatchAutoencoder (this teacher's: AutoencoderKL)" in capsys.readouterr().err
    for bad in ("pixel_channels=0", "pixel_blocks=-1"):
        with pytest.raises(ConfigError, match="pixel_channels must be >= 1 and pixel_blocks >= 0"):
            check(load_config(cfg, ["stages.demo-teacher-decoder={}", f"stages.demo-teacher-decoder.{bad}"]), ["demo-teacher-decoder"])


def test_patch_tiny_vae_is_a_narrower_copy_of_the_teachers(workspace, tmp_path, capsys):
    """tiny_vae_class PatchAutoencoder: the demo teacher's VAE with narrower refiners, from its linear maps and scale."""
    torch.manual_seed(0)
    vae = PatchAutoencoder(**{**TINY_PATCH, "lapped": True, "scaling_factor": 0.8})
    vae.fit_linear(torch.rand(2, 3, 64, 64) * 2 - 1)
    torch.nn.init.normal_(vae.encoder.refiner.conv_out.weight, std=1e-3)  # a trained teacher VAE's refiner adds a little
    TSDSRPipeline(make_sd3(seed=9, num_layers=8), vae, torch.randn(5, 32) * 0.1, torch.randn(24) * 0.1).save_pretrained(tmp_path / "teacher")
    args = [f"teacher={tmp_path / 'teacher'}", "name=patch", "tiny_vae_class=PatchAutoencoder", "tiny_patch_vae={channels: 4, blocks: 1}"]
    cfg = str(workspace / "tiny.yaml")
    assert trainer_main(["vae-encoder", "--config", cfg, *args, "stages.vae-encoder.steps=4"]) == 0
    tiny = PatchAutoencoder.from_pretrained(workspace / "runs" / "patch" / "vae-encoder" / "final" / "vae")
    assert (tiny.config.channels, tiny.config.patch_size, tiny.config.lapped, tiny.config.scaling_factor) == (4, 4, True, 0.8)
    assert torch.equal(tiny.decoder.synthesis.weight, vae.decoder.synthesis.weight)  # copied; vae-encoder leaves the decoder
    first = log_rows(workspace, "vae-encoder", "patch")[0]["loss"]
    with torch.no_grad():
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        fresh = float(torch.nn.functional.mse_loss(PatchAutoencoder(**TINY_PATCH).encode(x), vae.encode(x)))
    assert first < 1e-3 * fresh  # it starts from the teacher's linear maps, not from random ones
    TinySRPipeline(make_student(), tiny).save_pretrained(tmp_path / "student")  # the pipeline takes it as its VAE
    assert TinySRPipeline.from_pretrained(tmp_path / "student")(random_image(16, 16)).image.shape == (3, 64, 64)
    assert trainer_main(["vae-encoder", "--config", cfg, "name=patch-kl", "tiny_vae_class=PatchAutoencoder"]) == 2
    assert "needs a PatchAutoencoder E_pre to copy (pretrained_vae, else the teacher's VAE: AutoencoderKL)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="tiny_vae_class must be one of"):
        check(load_config(cfg, ["tiny_vae_class=AutoencoderTiny"]), ["vae-encoder"])


def test_patch_encoder_starts_from_the_teacher_vaes_linear_map(workspace):
    """tiny_vae.encoder_type patch (the bundled demo's): E_pre's linear patch map copied, or a clear refusal."""
    torch.manual_seed(0)
    e_pre = PatchAutoencoder(**{**TINY_PATCH, "lapped": True})
    e_pre.fit_linear(torch.rand(2, 3, 32, 32) * 2 - 1)
    cfg = workspace / "tiny.yaml"
    vae = new_tiny_vae(load_config(cfg, ["tiny_vae.encoder_type=patch", "tiny_vae.num_stages=2"]), e_pre, 0.7)
    assert torch.equal(vae.encoder.linear.weight, e_pre.encoder.linear.weight) and vae.config.scaling_factor == 0.7
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(x), e_pre.encode(x))  # both refiners start at zero: the same encoder
    with pytest.raises(ConfigError, match="needs a PatchAutoencoder with 8-px patches"):
        new_tiny_vae(load_config(cfg, ["tiny_vae.encoder_type=patch"]), e_pre, 0.7)  # num_stages 3: 8-px patches, E_pre has 4


def test_demo_prior_restorations_become_the_teachers_target(workspace):
    """demo-prior writes Real-ESRGAN's x4 of every LQ once; with target realesrgan both stand-ins train on them."""
    from tinysr.baselines import RealESRGANUpscaler
    from trainer.common import PairDataset

    cfg = str(workspace / "tiny.yaml")
    run = workspace / "runs" / "prior"
    with pytest.raises(FileNotFoundError, match="demo-prior"):
        PairDataset(workspace / "pairs", 64, prior_dir=workspace / "absent")
    assert trainer_main(["demo-prior", "--config", cfg, "name=prior", "stages.demo-prior={batch_size: 4}"]) == 0
    written = sorted((run / "demo-prior" / "final").glob("*.png"))
    assert [p.name for p in written] == [f"p{i}.png" for i in range(6)]
    lq = load_image(workspace / "pairs" / "lq" / "p3.png").rgb
    expected = RealESRGANUpscaler()(lq).image  # the product's Real-ESRGAN on one whole crop, 8-bit like the file
    assert (load_image(written[3]).rgb - expected).abs().max() <= 1 / 255 + 1e-6
    stamps = [p.stat().st_mtime_ns for p in written]
    assert trainer_main(["demo-prior", "--config", cfg, "name=prior", "stages.demo-prior={batch_size: 4}"]) == 0
    assert [p.stat().st_mtime_ns for p in written] == stamps  # cached: computed once, reused

    lapped = {**TINY_PATCH, "lapped": True}
    train_standins(cfg, "PatchAutoencoder", lapped, 8, {"w_l1": 1.0}, {"w_l1": 1.0, "w_image_l1": 1.0}, ["name=prior", "standins.target=realesrgan"])
    rows = log_rows(workspace, "demo-teacher", "prior")
    assert all(r["identity_l1"] > 0 and "image_l1" in r for r in rows)
    assert falls([r["loss"] for r in rows])
    with pytest.raises(ConfigError, match="standins.target"):
        check(load_config(cfg, ["standins.target=esrgan"]), ["distill-1"])


def test_dihedral_teacher_pairs_encode_each_flip_and_turn(workspace):
    """stages.demo-teacher.dihedral: all eight views of every pair, input and target turned alike, each encoded."""
    from tinysr.pipelines.base import vae_encode
    from trainer.stages.standins import DIHEDRAL, EncodedPairs

    torch.manual_seed(0)
    vae = PatchAutoencoder(**{**TINY_PATCH, "lapped": True})
    vae.fit_linear(torch.rand(2, 3, 32, 32) * 2 - 1)
    torch.nn.init.normal_(vae.encoder.refiner.conv_out.weight, std=0.1)  # a refiner makes the encoder non-linear
    pairs = [{"lq_up": torch.rand(3, 32, 32) * 2 - 1, "prior": torch.rand(3, 32, 32) * 2 - 1} for _ in range(3)]
    plain = EncodedPairs(pairs, vae, "prior", True, "cpu")
    data = EncodedPairs(pairs, vae, "prior", True, "cpu", dihedral=True)
    assert len(plain) == 3 and len(data) == 24
    x = pairs[1]["lq_up"][None]
    views = [view(x) for view in DIHEDRAL]
    assert all(not torch.equal(views[i], views[j]) for i in range(8) for j in range(i))  # eight different images
    assert torch.equal(views[5], torch.rot90(x.flip(-1), 1, dims=(-2, -1)))
    for k, view in enumerate(views):
        item = data[3 * k + 1]
        assert torch.equal(item["image"], DIHEDRAL[k](pairs[1]["prior"][None])[0])
        with torch.no_grad():
            assert torch.allclose(item["z_lq"], vae_encode(vae, view)[0], atol=1e-5)
    assert torch.equal(data[1]["z_target"], plain[1]["z_target"])  # the first view is the pair itself
    assert not torch.allclose(data[3 + 1]["z_lq"], vae_encode(vae, views[0]).rot90(1, dims=(-2, -1))[0], atol=1e-3)  # latents do not turn with it


@pytest.mark.parametrize("name, kept", [("paper", 12), ("paper-prune33", 16), ("paper-prune67", 8)])
def test_paper_configs_and_their_pruning_ratios(name, kept, tmp_path):
    """Table C.2's variants inherit paper.yaml (`base:`) and keep 50%, 67%, 33% of SD3's 24 blocks."""
    from trainer.stages.pruning import BlockMaskSampler

    cfg = load_config(ROOT / "trainer" / "configs" / f"{name}.yaml", ["data.pairs=PAIRS"])
    assert cfg.name == name and cfg.seed == 80 and cfg.mixed_precision == "fp16"
    assert cfg.stages["distill-1"].lora_rank == 64 and cfg.stages["distill-2"].w_gan == 0.3
    # where the paper is silent, the official code's values (README: Fidelity), through stage_defaults
    for stage in ("vae-encoder", "vae-decoder", "prune-search", "distill-1", "distill-2"):
        st = cfg.stages[stage]
        assert (st.weight_decay, st.lr_scheduler, st.lr_warmup_steps, st.max_grad_norm) == (1e-4, "cosine_with_restarts", 3000, 1.0)
    assert cfg.stages["vae-decoder"].perceptual == cfg.stages["distill-2"].perceptual == "lpips-alex"
    assert cfg.stages["distill-2"].discriminator == "dino-projected" and cfg.stages["distill-2"].disc_weight_decay == 1e-4
    assert cfg.stages["prune-search"].ema_decay == 0.999 and not cfg.stages["prune-export"].keep_search_lora
    assert "proj" in cfg.stages["distill-1"].lora_targets and cfg.stages["distill-2"].continue_lora
    s = cfg.stages["prune-search"]
    sampler = BlockMaskSampler(24, s.group_size, s.keep_per_group, s.couple_pairs)
    with torch.no_grad():
        sampler.group_logits.normal_(generator=torch.Generator().manual_seed(1))
    assert len(sampler.kept_blocks()) == kept
    assert all(sampler.sample(1.0, 1.0, torch.Generator().manual_seed(i)).sum() == kept for i in range(20))
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_switched_decoder_takes_its_modes_on_a_vae_saved_before_they_were_config_keys(tmp_path):
    """decoder-tune's upsample/padding switch on a tiny VAE whose config.json lacks those keys (diffusers would keep
    the defaults it filled in on loading)."""
    from tinysr.models import TinyAutoencoder
    from trainer.stages.vae import switched_decoder

    TinyAutoencoder(channels=8, num_stages=2, blocks_per_stage=1).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k not in ("upsample_mode", "padding_mode")}))
    vae = TinyAutoencoder.from_pretrained(tmp_path)
    switched = switched_decoder(vae, {"upsample_mode": "bilinear", "padding_mode": ""})
    assert switched.config.upsample_mode == "bilinear" and switched.config.padding_mode == vae.config.padding_mode
    assert all(torch.equal(v, switched.state_dict()[k]) for k, v in vae.state_dict().items())
