"""The Gradio app: its functions, then the real app in a subprocess driven by gradio_client and a headless browser."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import app
from tinysr import TinySRPipeline, TSDSRPipeline
from trainer.launch import LaunchError, LaunchRequest

from .conftest import make_kl, make_sd3, make_student, make_tiny_vae, random_image

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


def save_rgb(path, h, w, seed=0):
    Image.fromarray((random_image(h, w, seed).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("app-models")
    TinySRPipeline(make_student(), make_tiny_vae()).save_pretrained(root / "tinysr")
    TSDSRPipeline(make_sd3(num_layers=4), make_kl(), torch.randn(5, 32) * 0.1, torch.randn(24) * 0.1).save_pretrained(root / "tsdsr")
    return root


@pytest.fixture
def env_models(models, monkeypatch):
    monkeypatch.setenv("TINYSR_MODEL", str(models / "tinysr"))
    monkeypatch.setenv("TSDSR_MODEL", str(models / "tsdsr"))
    app.get_pipeline.cache_clear()
    yield
    app.get_pipeline.cache_clear()


def test_compare_reports_latency_memory_params_and_scores(env_models, tmp_path):
    path = save_rgb(tmp_path / "in.png", 32, 48)
    gt = save_rgb(tmp_path / "gt.png", 128, 192, seed=1)
    (left, right), rep_l, rep_r, file_l, file_r, images = app.compare(path, "tinysr", "tsdsr", gt_path=gt)
    assert left.size == right.size == (192, 128)
    for report in (rep_l, rep_r):
        assert "Latency" in report and "Peak memory" in report and "Parameters" in report
        assert "| NIQE |" in report and "| PSNR |" in report and "| SSIM |" in report
    assert "(" + str(Path(os.environ["TINYSR_MODEL"])) in app.model_label("tinysr")
    assert Image.open(file_l).size == (192, 128) and Image.open(file_r).size == (192, 128)
    assert app.change_view(images, "bicubic | right")[0].size == (192, 128)
    with pytest.raises(gr.Error, match="must be 192x128"):
        app.compare(path, "tinysr", "bicubic", gt_path=save_rgb(tmp_path / "bad_gt.png", 10, 10))


def test_official_recipe_from_the_advanced_options(env_models, tmp_path):
    path = save_rgb(tmp_path / "in.png", 32, 40)
    (left, right), rep_l, rep_r, *_ = app.compare(path, "tinysr", "bicubic", tile=32, recipe="official")
    assert left.size == right.size == (160, 128)
    assert "Recipe**: official" in rep_l and "Recipe" not in rep_r  # bicubic has one recipe
    default = app.compare(path, "tinysr", "bicubic", tile=32)[0][0]
    assert not np.array_equal(np.asarray(left), np.asarray(default))
    with pytest.raises(gr.Error, match="position table"):
        app.compare(path, "tinysr", "bicubic", tile=128, recipe="official")


def test_missing_weights_are_a_notice_and_bad_uploads_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSR_MODEL", str(tmp_path / "absent"))
    app.get_pipeline.cache_clear()
    path = save_rgb(tmp_path / "in.png", 8, 8)
    (left, right), rep_l, rep_r, file_l, _, _ = app.compare(path, "tinysr", "bicubic")
    assert left is None and file_l is None and "weights missing" in rep_l and "absent" in rep_l
    assert right.size == (32, 32) and "NIQE unavailable: failed on this image" in rep_r  # NIQE needs >= 96 px
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(gr.Error, match="not an image"):
        app.compare(str(tmp_path / "bad.png"), "bicubic", "bicubic")
    with pytest.raises(gr.Error, match="Upload an image"):
        app.compare(None, "bicubic", "bicubic")


def test_degrade_and_restore_scores_against_the_clean_crop(env_models, tmp_path):
    path = save_rgb(tmp_path / "clean.png", 100, 140)
    clean, lq, (a, b), table = app.degrade_and_restore(path, 3, 1.0, "tinysr", "bicubic")
    assert clean.size == (140, 100) and lq.size == (35, 25) and a.size == b.size == (140, 100)
    assert list(table["model"]) == ["Bicubic", "TinySR"] and {"psnr", "ssim", "niqe"} <= set(table.columns)
    again = app.degrade_and_restore(path, 3, 1.0, "tinysr", "bicubic")[1]
    assert np.array_equal(np.asarray(again), np.asarray(lq))  # the seed fixes the degradation
    stronger = app.degrade_and_restore(path, 3, 2.0, "bicubic", "bicubic")[3]
    assert stronger["psnr"][0] < table["psnr"][0]


def test_launch_requests_are_validated(tmp_path):
    good = LaunchRequest("distill-1", "demo.yaml", "run-1", steps=5)
    good.validate()
    cmd = good.command(use_cpu=True)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and "--cpu" in cmd and "stages.distill-1.steps=5" in cmd
    for bad, match in [
        (LaunchRequest("distill-1", "demo.yaml", "../../etc"), "run name"),
        (LaunchRequest("distill-1", "demo.yaml", "x; rm -rf /"), "run name"),
        (LaunchRequest("distill-1", "../paper.yaml", "ok"), "unknown config"),
        (LaunchRequest("rm -rf", "demo.yaml", "ok"), "unknown stage"),
        (LaunchRequest("distill-1", "demo.yaml", "ok", steps=-1), "steps"),
        (LaunchRequest("distill-1", "demo.yaml", "ok", mixed_precision="fp8"), "mixed precision"),
    ]:
        with pytest.raises(LaunchError, match=match):
            bad.validate()


# ------------------------------------------------------------------------------------ the running app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """`python app.py` with tiny models, a tiny training config and its own runs folder."""
    root = tmp_path_factory.mktemp("app-server")
    pairs = root / "pairs"
    for sub in ("gt", "lq"):
        (pairs / sub).mkdir(parents=True)
    for i in range(4):
        save_rgb(pairs / "gt" / f"p{i}.png", 128, 128, seed=i)
        Image.open(pairs / "gt" / f"p{i}.png").resize((32, 32), Image.BICUBIC).save(pairs / "lq" / f"p{i}.png")
    (root / "configs").mkdir()
    config = {
        "name": "tiny", "teacher": str(models / "tsdsr"), "tiny_vae": {"channels": 8, "blocks_per_stage": 1},
        "data": {"pairs": str(pairs), "crop": 64},
        "stages": {"vae-encoder": {"steps": 100000, "batch_size": 2, "lr": 1e-3, "w_mse": 1.0, "log_every": 1}},
    }
    (root / "configs" / "tiny.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
        "TINYSR_MODEL": str(models / "tinysr"), "TSDSR_MODEL": str(models / "tsdsr"), "TINYSR_MAX_PIXELS": str(200 * 200),
        "TINYSR_CONFIG_DIR": str(root / "configs"), "TINYSR_RUNS_DIR": str(root / "runs"),
    }
    log = open(root / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert proc.poll() is None, (root / "app.log").read_text()
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("app did not start in 180 s:\n" + (root / "app.log").read_text())
    yield {"url": url, "root": root, "proc": proc}
    proc.terminate()
    proc.wait(20)
    log.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False)


def odd_images(folder: Path) -> dict:
    """Grayscale, 16-bit, CMYK and RGBA uploads that must work."""
    rgb = (random_image(20, 28).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    images = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "gray16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])),
    }
    for name, im in images.items():
        im.save(folder / name)
    return {name: folder / name for name in images}


def test_endpoints_upscale_and_survive_bad_input(client, server, tmp_path):
    from gradio_client import handle_file

    good = save_rgb(tmp_path / "in.png", 24, 32)
    for left, right in (("tinysr", "tsdsr"), ("bicubic", "realesrgan-x4plus")):
        slider, rep_l, rep_r, file_l, file_r = client.predict(handle_file(good), left, right, api_name="/compare")
        assert Image.open(slider[0]).size == Image.open(slider[1]).size == (128, 96)
        assert "Latency" in rep_l and "Latency" in rep_r and "NIQE" in rep_l
        assert Image.open(file_l).size == (128, 96)
    for path in odd_images(tmp_path).values():
        slider, *_ = client.predict(handle_file(str(path)), "tinysr", "bicubic", api_name="/compare")
        assert Image.open(slider[0]).size == (112, 80), path.name
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(good).read_bytes()[:200])
    giant = save_rgb(tmp_path / "giant.png", 240, 240)
    for path, message in ((tmp_path / "bad.png", "not an image"), (truncated, "corrupt or truncated"), (giant, "exceeds the limit")):
        with pytest.raises(Exception, match=message):
            client.predict(handle_file(str(path)), "tinysr", "tsdsr", api_name="/compare")
    clean, lq, pair, table = client.predict(handle_file(save_rgb(tmp_path / "clean.png", 96, 96)), 5, 1.0, "tinysr", "tsdsr", api_name="/degrade_restore")
    assert Image.open(clean).size == (96, 96) and Image.open(lq).size == (24, 24)
    assert [row[0] for row in table["data"]] == ["Bicubic", "TinySR", "TSD-SR"]
    table, _, summary = client.predict(str(server["root"] / "pairs" / "lq"), str(server["root"] / "pairs" / "gt"), ["bicubic", "tinysr"], ["psnr", "niqe"], 2, api_name="/benchmark")
    assert [row[0] for row in table["data"]] == ["Bicubic", "TinySR"] and "2 images" in summary
    assert server["proc"].poll() is None


def test_training_endpoints_launch_refuse_a_second_job_and_stop(client, server):
    message = client.predict("vae-encoder", "tiny.yaml", "api-run", 0, 0, 0, 1, "no", api_name="/train_start")
    assert "trainer vae-encoder" in message
    with pytest.raises(Exception, match="already running"):
        client.predict("vae-encoder", "tiny.yaml", "api-run-2", 0, 0, 0, 1, "no", api_name="/train_start")
    with pytest.raises(Exception, match="run name"):
        client.predict("vae-encoder", "tiny.yaml", "../escape", 0, 0, 0, 1, "no", api_name="/train_start")
    deadline = time.time() + 240
    while time.time() < deadline:
        status, *_ = client.predict(api_name="/train_status")
        if ("step" in status and " step 0" not in status) or "failed" in status:
            break
        time.sleep(2)
    console = (server["root"] / "runs" / "api-run" / "console.log").read_text()
    assert "running" in status and "of 100000" in status, status + console[-2000:]
    assert client.predict(api_name="/train_stop") == "Stopped."
    status, *_ = client.predict(api_name="/train_status")
    assert "stopped" in status
    assert (server["root"] / "runs" / "api-run" / "vae-encoder" / "log.jsonl").is_file()
    assert server["proc"].poll() is None


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_browser_upload_compare_and_train(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(server["url"])
        page.locator("#lr-input input[type=file]").set_input_files(str(ROOT / "assets" / "examples" / "copy_centre.png"))
        page.get_by_role("button", name="Upscale x4").click()
        expect(page.locator("#report-left")).to_contain_text("Latency", timeout=180_000)
        expect(page.locator("#report-right")).to_contain_text("NIQE", timeout=60_000)
        expect(page.locator("#comparison img").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "app_upscale.png"), full_page=True)
        page.locator("#lr-input input[type=file]").set_input_files(save_rgb(tmp_path / "small.png", 48, 40))
        page.get_by_text("Advanced").click()
        page.get_by_label("official").check()
        page.get_by_role("button", name="Upscale x4").click()
        expect(page.locator("#report-left")).to_contain_text("Recipe: official", timeout=180_000)
        expect(page.locator("#report-right")).to_contain_text("Recipe: official", timeout=60_000)

        page.get_by_role("tab", name="Training").click()
        page.get_by_label("Run name").fill("browser-run")
        page.get_by_role("button", name="Start").click()
        expect(page.locator("#train-status")).to_contain_text("running", timeout=60_000)
        expect(page.locator("#train-status")).to_contain_text(re.compile(r"step [1-9]\d* of 100000"), timeout=180_000)
        page.screenshot(path=str(ARTIFACTS / "app_training.png"), full_page=True)
        page.get_by_role("button", name="Stop").click()
        expect(page.locator("#train-message")).to_contain_text("Stopped", timeout=60_000)
        expect(page.locator("#train-status")).to_contain_text("stopped", timeout=30_000)

        page.get_by_role("tab", name="Degrade and restore").click()
        page.locator("#clean-input input[type=file]").set_input_files(save_rgb(tmp_path / "clean.png", 160, 160))
        page.get_by_role("button", name="Degrade and restore").click()
        expect(page.locator("#degrade-table")).to_contain_text("TinySR", timeout=180_000)
        page.screenshot(path=str(ARTIFACTS / "app_degrade.png"), full_page=True)

        page.get_by_role("tab", name="Benchmark").click()
        page.get_by_label("LR folder (on the server)").fill(str(server["root"] / "pairs" / "lq"))
        page.get_by_label("GT folder (optional)").fill(str(server["root"] / "pairs" / "gt"))
        page.get_by_role("button", name="Run benchmark").click()
        expect(page.locator("#bench-summary")).to_contain_text("4 images from", timeout=180_000)  # the table shows progress text too
        expect(page.locator("#bench-table")).to_contain_text("TinySR")
        page.screenshot(path=str(ARTIFACTS / "app_benchmark.png"), full_page=True)

        page.get_by_role("tab", name="About").click()
        expect(page.locator("#about")).to_contain_text("Efficiency")
        page.screenshot(path=str(ARTIFACTS / "app_about.png"), full_page=True)
        browser.close()
    assert server["proc"].poll() is None


def test_about_shows_the_pruning_decision_of_the_model_in_use(tmp_path, monkeypatch):
    import json

    from trainer.stages.pruning import BlockMaskSampler

    sampler = BlockMaskSampler(8, 4, 2, couple_pairs=True)
    (tmp_path / "pruning.json").write_text(json.dumps(sampler.decision()))
    monkeypatch.setenv("TINYSR_MODEL", str(tmp_path))
    text = app.about_markdown()
    assert "4 of 8 teacher blocks kept" in text
    assert "| group 0 | ■ ■ □ □ | 0, 1 |" in text and "| group 1 | ■ ■ □ □ | 4, 5 |" in text  # zero logits: first candidates
    assert "bench-paper-h200.json" in text and "TSD-SR / TinySR" in text


def test_about_and_benchmark_show_what_the_bundled_weights_scored(tmp_path, monkeypatch):
    import json

    metrics = {"synthetic": {"bicubic": {"psnr": 21.919, "ssim": 0.5591, "niqe": 9.97, "st_lpips": 0.5471},
                             "tinysr": {"psnr": 21.5, "ssim": 0.56, "niqe": 8.0, "st_lpips": 0.4987, "st_lpips_vgg": 0.4123, "lattice": 1.234}}}
    (tmp_path / "demo_metrics.json").write_text(json.dumps({"metrics": metrics}))
    monkeypatch.setattr(app, "DEMO_METRICS", tmp_path / "demo_metrics.json")
    text = app.about_markdown()
    assert "| Bicubic | 21.92 | 0.5591 | 0.5471 | - | 9.970 | - |" in text
    assert "| TinySR (demo scale, bundled) | 21.50 | 0.5600 | 0.4987 | 0.4123 | 8.000 | 1.23 |" in text
    monkeypatch.setattr(app, "DEMO_METRICS", tmp_path / "absent.json")
    assert "absent.json is missing" in app.demo_quality_markdown()
