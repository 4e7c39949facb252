"""The bundled demo-scale weights (assets/weights/): the default models, offline, small, and not broken."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from scripts.report_demo_weights import PROVENANCE
from tinysr.pipelines import TinySRPipeline, TSDSRPipeline, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "assets" / "weights"
EXAMPLE = ROOT / "assets" / "examples" / "lake_boats.png"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(F.mse_loss(a.clamp(0, 1), b)))


def test_bundled_weights_are_the_defaults_and_restore_a_photo(monkeypatch):
    for env in ("TINYSR_MODEL", "TSDSR_MODEL", "TSDSR_LORA_DIR"):
        monkeypatch.delenv(env, raising=False)
    assert sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file()) <= 25 * 2**20
    gt = torch.from_numpy(np.asarray(Image.open(EXAMPLE).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    lr = F.interpolate(gt[None], scale_factor=0.25, mode="bicubic", antialias=True)[0].clamp(0, 1)
    bicubic = F.interpolate(lr[None], size=gt.shape[-2:], mode="bicubic")[0]
    for name, cls in (("tinysr", TinySRPipeline), ("tsdsr", TSDSRPipeline)):
        folder = WEIGHTS / f"{name}-demo"
        card = (folder / "README.md").read_text()
        assert "demo scale" in card
        assert PROVENANCE in card  # written by the report script as it is now
        pipe = load_pipeline(name, device="cpu")
        assert isinstance(pipe, cls) and pipe.transformer.dtype == torch.float32
        assert pipe.remove_token_pattern  # demo-realesrgan.yaml: both take their token grid out
        out = pipe(lr).image
        assert out.shape == gt.shape
        # random weights land near 10 dB; trained ones near bicubic (they also denoise and sharpen)
        assert psnr(out, gt) > psnr(bicubic, gt) - 3.0


def test_app_defaults_to_the_bundled_demo_weights(monkeypatch):
    from webapp import common, upscale

    for env in ("TINYSR_MODEL", "TSDSR_MODEL", "TSDSR_LORA_DIR"):
        monkeypatch.delenv(env, raising=False)
    common.get_pipeline.cache_clear()
    try:
        assert "demo scale" in common.model_label("tinysr") and "demo scale" in common.model_label("tsdsr")
        (left, right), rep_l, rep_r, file_l, file_r, _ = upscale.compare(str(ROOT / "assets" / "examples" / "copy_centre.png"), "tinysr", "tsdsr")
        assert Image.open(left).size == Image.open(right).size == (800, 600)
        assert "Latency" in rep_l and "Latency" in rep_r and file_l and file_r
    finally:
        common.get_pipeline.cache_clear()


def test_retraining_check_reports_how_far_a_retrained_tensor_moved(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from scripts.train_demo_weights import weight_differences

    retrained = tmp_path / "weights"
    shutil.copytree(WEIGHTS, retrained)
    assert set(weight_differences(retrained).values()) == {0.0}
    vae = retrained / "tinysr-demo" / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae)
    name = min(tensors)
    tensors[name] = tensors[name] + 0.25
    save_file(tensors, vae)
    differences = weight_differences(retrained)
    assert differences["tinysr-demo/vae/diffusion_pytorch_model.safetensors"] > 0.2
    assert differences["tsdsr-demo/transformer/diffusion_pytorch_model.safetensors"] == 0.0
    save_file({"renamed": tensors[name]}, vae)
    assert weight_differences(retrained)["tinysr-demo/vae/diffusion_pytorch_model.safetensors"] == float("inf")


def test_published_folders_carry_no_path_of_the_machine_that_trained_them(tmp_path, tiny_pipeline):
    import json

    from scripts.train_demo_weights import publish

    for path in WEIGHTS.rglob("*.json"):
        text = path.read_text()
        assert "_name_or_path" not in text and '": "/' not in text, path
    tiny_pipeline.remove_token_pattern = True
    source = tiny_pipeline.save_pretrained(tmp_path / "export")
    (source / "training.json").write_text(json.dumps({"run": "tiny", "teacher": str(tmp_path / "tsdsr-demo")}))
    (source / "pruning.json").write_text(json.dumps({"source": str(ROOT / "runs" / "tiny" / "prune-search" / "final")}))
    publish(source, tmp_path / "published")
    published = tmp_path / "published"
    assert json.loads((published / "training.json").read_text())["teacher"] == "tsdsr-demo"  # the one published beside it
    assert json.loads((published / "pruning.json").read_text())["source"] == "runs/tiny/prune-search/final"
    assert not any("_name_or_path" in path.read_text() for path in published.glob("*/config.json"))
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(published / "transformer" / "diffusion_pytorch_model.safetensors").values()} == {torch.float16}
    assert load_pipeline(str(published)).remove_token_pattern


def test_the_retraining_script_runs_the_prior_only_for_a_config_that_uses_it():
    """demo.yaml (the bundled weights' recipe) has no prior step; demo-realesrgan.yaml runs it before the stand-ins."""
    from scripts.train_demo_weights import steps

    plain = [name for name, _ in steps(config="trainer/configs/demo.yaml")]
    prior = [name for name, _ in steps(name="x", config="trainer/configs/demo-realesrgan.yaml")]
    assert "demo-prior" not in plain
    assert prior.index("pairs") < prior.index("demo-prior") < prior.index("demo-base-vae")
    # the tuned teacher is published, then again with its pixel refiner, before the chain distils from it
    assert prior.index("demo-teacher") < prior.index("demo-teacher-tune") < prior.index("publish-teacher") < prior.index("demo-teacher-decoder")
    assert prior.index("demo-teacher-decoder") < prior.index("publish-teacher-decoder") < prior.index("vae-encoder")
    assert "demo-teacher-tune" not in plain and "demo-teacher-decoder" not in plain
    command = dict(steps(name="x", config="trainer/configs/demo-realesrgan.yaml"))["demo-teacher"]
    assert "trainer/configs/demo-realesrgan.yaml" in command and "name=x" in command


def test_comparison_sheet_crops_the_most_detailed_and_the_smoothest_window(tmp_path):
    """The sheet's crops: where detail shows (sharpness) and where a flat area would show a grid."""
    import os
    import subprocess
    import sys

    from scripts.comparison_sheet import crop_box

    image = torch.full((3, 64, 64), 0.5)
    image[:, 32:, 32:] = (torch.arange(32)[None, :] % 2).float().expand(3, 32, 32)  # a checkerboard-like corner
    assert crop_box(image, 16, "detail") == (32, 32, 48, 48)  # the first window wholly inside the stripes
    assert crop_box(image, 16, "smooth") == (0, 0, 16, 16)
    lr = tmp_path / "lr.png"
    Image.fromarray((torch.rand(24, 20, 3) * 255).byte().numpy()).save(lr)
    out = tmp_path / "sheet.png"
    result = subprocess.run(
        [sys.executable, "scripts/comparison_sheet.py", str(lr), "-o", str(out), "--models", "bicubic,tinysr", "--crop", "32", "--zoom", "1"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (2 * 32, 20 + 2 * 32)  # 2 models x (detail, smooth) rows under the labels


def test_model_cards_say_which_precision_the_benchmark_found_faster():
    """The cards' precision advice comes from the run they report: CPUs differ (emulated bf16 is slower, AMX's faster)."""
    from scripts.report_demo_weights import precision_note

    def bench(fp32, bf16, native):
        latency = {"fp32": {"total": fp32}, "bf16": {"total": bf16}}
        return {"device": "cpu (x86_64, 2 threads)", "native_bf16": native, "matmul_gflops": {"fp32": 343.0, "bf16": 1902.0}}, {"latency": latency}

    amx = precision_note(*bench(0.172, 0.118, True))
    assert "native bf16: yes" in amx and "0.69x" in amx and "bf16 is the faster" in amx and "1902 against 343" in amx
    emulated = precision_note(*bench(0.396, 0.785, False))
    assert "native bf16: no" in emulated and "1.98x" in emulated and "fp32 is the faster" in emulated
    older, entry = bench(0.396, 0.785, None)
    del older["native_bf16"]
    assert "native bf16" not in precision_note(older, entry)  # not recorded: not guessed
    assert precision_note(older, {"latency": {"fp32": {"total": 0.4}}}) == ""
