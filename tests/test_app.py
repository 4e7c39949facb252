"""The Gradio app: its functions, then the real app in a subprocess driven by gradio_client and a headless browser."""

import json
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

from tinysr import TinySRPipeline, TSDSRPipeline
from tinysr.errors import TinySRError
from trainer.launch import LaunchError, LaunchRequest, TrainingJob
from webapp import about, common, paths, training, upscale

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
    common.get_pipeline.cache_clear()
    yield
    common.get_pipeline.cache_clear()


def test_compare_reports_latency_memory_params_and_scores(env_models, tmp_path):
    path = save_rgb(tmp_path / "in.png", 32, 48)
    gt = save_rgb(tmp_path / "gt.png", 128, 192, seed=1)
    (left, right), rep_l, rep_r, file_l, file_r, shown = upscale.compare(path, "tinysr", "tsdsr", gt_path=gt)
    assert Image.open(left).size == Image.open(right).size == (192, 128)
    for report in (rep_l, rep_r):
        assert "Latency" in report and "Peak memory" in report and "Parameters" in report
        assert "| NIQE |" in report and "| PSNR |" in report and "| SSIM |" in report
    assert "(" + str(Path(os.environ["TINYSR_MODEL"])) in common.model_label("tinysr")
    assert Image.open(file_l).size == (192, 128) and Image.open(file_r).size == (192, 128)
    bicubic, right_again = upscale.change_view(shown, "bicubic | right")
    assert bicubic.size == (192, 128) and right_again == right
    Path(right).unlink()  # the outputs folder's cap deleted it: a sentence, not a blank side
    with pytest.raises(gr.Error, match="deleted to keep the outputs folder under its cap"):
        upscale.change_view(shown, "left | right")
    with pytest.raises(gr.Error, match="must be 192x128"):
        upscale.compare(path, "tinysr", "bicubic", gt_path=save_rgb(tmp_path / "bad_gt.png", 10, 10))


def test_official_recipe_from_the_advanced_options(env_models, tmp_path):
    path = save_rgb(tmp_path / "in.png", 32, 40)
    (left, right), rep_l, rep_r, *_ = upscale.compare(path, "tinysr", "bicubic", tile=32, recipe="official")
    assert Image.open(left).size == Image.open(right).size == (160, 128)
    assert "Recipe**: official" in rep_l and "Recipe" not in rep_r  # bicubic has one recipe
    default = upscale.compare(path, "tinysr", "bicubic", tile=32)[0][0]
    assert not np.array_equal(np.asarray(Image.open(left)), np.asarray(Image.open(default)))
    with pytest.raises(gr.Error, match="position table"):
        upscale.compare(path, "tinysr", "bicubic", tile=128, recipe="official")


def test_missing_weights_are_a_notice_and_bad_uploads_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSR_MODEL", str(tmp_path / "absent"))
    common.get_pipeline.cache_clear()
    path = save_rgb(tmp_path / "in.png", 8, 8)
    (left, right), rep_l, rep_r, file_l, _, _ = upscale.compare(path, "tinysr", "bicubic")
    assert left is None and file_l is None and "weights missing" in rep_l and "absent" in rep_l
    assert Image.open(right).size == (32, 32) and "NIQE unavailable: failed on this image" in rep_r  # NIQE needs >= 96 px
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(gr.Error, match="not an image"):
        upscale.compare(str(tmp_path / "bad.png"), "bicubic", "bicubic")
    with pytest.raises(gr.Error, match="Upload an image"):
        upscale.compare(None, "bicubic", "bicubic")


def test_degrade_and_restore_scores_against_the_clean_crop(env_models, tmp_path):
    path = save_rgb(tmp_path / "clean.png", 100, 140)
    clean, lq, (a, b), table = upscale.degrade_and_restore(path, 3, 1.0, "tinysr", "bicubic")
    assert clean.size == (140, 100) and lq.size == (35, 25) and a.size == b.size == (140, 100)
    assert list(table["model"]) == ["Bicubic", "TinySR"] and {"psnr", "ssim", "niqe"} <= set(table.columns)
    again = upscale.degrade_and_restore(path, 3, 1.0, "tinysr", "bicubic")[1]
    assert np.array_equal(np.asarray(again), np.asarray(lq))  # the seed fixes the degradation
    stronger = upscale.degrade_and_restore(path, 3, 2.0, "bicubic", "bicubic")[3]
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


def test_launch_preflight_says_what_to_run_first(tmp_path, monkeypatch):
    import trainer.launch

    pairs = tmp_path / "pairs"
    for sub in ("gt", "lq"):
        (pairs / sub).mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "c.yaml").write_text(yaml.safe_dump({"teacher": "tsdsr", "data": {"pairs": str(tmp_path / "absent")}, "stages": {
        "vae-encoder": {}, "distill-1": {}}}))
    monkeypatch.setattr(trainer.launch, "CONFIG_DIR", tmp_path / "configs")
    monkeypatch.setattr(trainer.launch, "RUNS", tmp_path / "runs")
    with pytest.raises(LaunchError, match="has no gt/ and lq/ folders; make them with `python -m tinysr degrade`"):
        LaunchRequest("vae-encoder", "c.yaml", "r").preflight()
    LaunchRequest("vae-encoder", "c.yaml", "r", pairs=str(pairs)).preflight()
    with pytest.raises(LaunchError, match=r"distill-1 reads the output of prune-export, vae-decoder .* run `python -m trainer prune-export"):
        LaunchRequest("distill-1", "c.yaml", "r", pairs=str(pairs)).preflight()


def test_a_running_job_reports_its_stages_after_its_config_is_gone(tmp_path, monkeypatch):
    import trainer.launch

    class Running:  # the subprocess, which this test does not need
        pid = 0

        def poll(self):
            return None

    pairs = tmp_path / "runs" / "pairs"
    for sub in ("gt", "lq"):
        (pairs / sub).mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.yaml"
    chain = ["vae-encoder", "vae-decoder", "cache", "prune-search", "prune-export", "distill-1", "distill-2", "export"]
    stages = {stage: {"steps": 7 + i} for i, stage in enumerate(chain)}
    config.write_text(yaml.safe_dump({"teacher": "tsdsr", "stages": {**stages, "decoder-tune": {"steps": 30}}}))
    monkeypatch.setattr(trainer.launch, "CONFIG_DIR", tmp_path / "configs")
    monkeypatch.setattr(trainer.launch, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(trainer.launch.subprocess, "Popen", lambda *a, **k: Running())
    job = TrainingJob()
    job.start(LaunchRequest("all", "c.yaml", "r", pairs=str(pairs)), use_cpu=True)
    config.unlink()
    status = job.status()
    assert (status["state"], status["stage"], status["target_steps"]) == ("running", "vae-encoder", 7)
    (tmp_path / "runs" / "r" / "vae-decoder").mkdir()
    (tmp_path / "runs" / "r" / "vae-decoder" / "log.jsonl").write_text(json.dumps({"stage": "vae-decoder", "step": 3, "loss": 1.0}) + "\n")
    status = job.status()
    assert (status["stage"], status["target_steps"], len(status["rows"])) == ("vae-decoder", 8, 1)
    assert job.stages == [*chain[:-1], "decoder-tune", "export"] and job.targets["decoder-tune"] == 30


def test_server_folders_only_under_the_allowed_roots(tmp_path, monkeypatch):
    root, outside = tmp_path / "data", tmp_path / "private"
    (root / "set").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    monkeypatch.setenv("TINYSR_DATA_ROOTS", str(root))
    assert paths.allowed_folder(str(root / "set"), "LR folder") == (root / "set").resolve()
    for text, why in [("/etc", "outside the folders"), (str(outside), "outside the folders"), (str(root / "escape"), "outside the folders"),
                      (f"{root}/set/../../private", "contains '..'"), (str(root / "absent"), "not a folder"), ("", "give a folder")]:
        with pytest.raises(TinySRError, match=why):
            paths.allowed_folder(text, "LR folder")


def test_uploads_unpack_within_limits(tmp_path, monkeypatch):
    import zipfile

    img = save_rgb(tmp_path / "a.png", 16, 16)
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        z.write(img, "set/lr/a.png")
        z.write(img, "set/HR/a.png")
        z.write(img, "../../evil.png")  # zip-slip: skipped, never written outside
        z.writestr("notes.txt", "not an image")
    lr, gt = paths.unpack_upload([str(tmp_path / "set.zip")], tmp_path / "out")
    assert [p.name for p in lr.iterdir()] == ["a.png"] and [p.name for p in gt.iterdir()] == ["a.png"]
    assert not list(tmp_path.parent.glob("**/evil.png"))
    lr, gt = paths.unpack_upload([img], tmp_path / "flat")
    assert [p.name for p in lr.iterdir()] == ["a.png"] and gt is None
    (tmp_path / "a.txt").write_text("not an image")
    with pytest.raises(TinySRError, match="no images"):
        paths.unpack_upload([str(tmp_path / "a.txt")], tmp_path / "none")
    monkeypatch.setattr(paths, "UPLOAD_MB", 0.0001)
    with pytest.raises(TinySRError, match="too large"):
        paths.unpack_upload([str(tmp_path / "set.zip")], tmp_path / "big")


def test_visitors_read_sentences_not_tracebacks():
    @common.sentences
    def broken():
        raise KeyError("columns")

    @common.sentences
    def greedy():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 6300000000 bytes.")

    with pytest.raises(gr.Error, match="did not foresee .KeyError.*server is still up"):
        broken()
    with pytest.raises(gr.Error, match=r"Out of memory: this image does not fit \(one step alone asked for 5.9 GB; the limit here is"):
        greedy()


def test_outputs_folder_keeps_the_newest_files_under_its_cap(tmp_path):
    now = time.time()
    for i in range(10):
        (tmp_path / "sub").mkdir(exist_ok=True)
        f = tmp_path / ("sub" if i % 2 else ".") / f"f{i}.png"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (now - 100 + i, now - 100 + i))
    (tmp_path / "young.png").write_bytes(b"x" * 5000)
    common.trim_folder(tmp_path, 8000, keep={(tmp_path / "f0.png").resolve()})
    left = sorted(p.name for p in tmp_path.rglob("*.png"))
    assert left == ["f0.png", "f8.png", "f9.png", "young.png"]  # the oldest went first; a file still being sent stays


def test_login_from_the_environment(monkeypatch):
    import app

    monkeypatch.delenv("TINYSR_AUTH", raising=False)
    assert app.auth_pairs() is None
    monkeypatch.setenv("TINYSR_AUTH", "ana:s3cret:colon,bo:pw")
    assert app.auth_pairs() == [("ana", "s3cret:colon"), ("bo", "pw")]
    monkeypatch.setenv("TINYSR_AUTH", "nopassword")
    with pytest.raises(SystemExit, match="user:password"):
        app.auth_pairs()


def test_an_unknown_attention_setting_stops_the_app_before_it_starts(monkeypatch):
    import app

    monkeypatch.setenv("TINYSR_CPU_ATTENTION", "blocked")
    assert app.attention_setting() == "blocked"
    monkeypatch.setenv("TINYSR_CPU_ATTENTION", "flash")
    with pytest.raises(SystemExit, match="TINYSR_CPU_ATTENTION='flash' is not a CPU attention kernel"):
        app.attention_setting()


def test_the_server_forgets_the_oldest_visitors_beyond_its_cap(monkeypatch, tmp_path):
    """gradio keeps a copy of the page for each session (1-4 MB): a public server's memory must not grow with
    its visitors, so at most TINYSR_SESSIONS are held."""
    from gradio_client import Client, handle_file

    import app

    monkeypatch.setattr(app, "SESSIONS", 3)
    demo = app.build_demo()
    port = free_port()
    app.serve(demo, server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        path = save_rgb(tmp_path / "in.png", 8, 8)
        for _ in range(6):
            out, _ = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(handle_file(path), "bicubic", api_name="/upscale")
            assert Image.open(out).size == (32, 32)
        assert len(demo.state_holder.session_data) == 3
    finally:
        demo.close()


def test_hosted_mode_refuses_training_and_start_waits_for_pairs(tmp_path, monkeypatch):
    import trainer.launch

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "fresh.yaml").write_text(yaml.safe_dump({"teacher": "tsdsr", "data": {"pairs": str(tmp_path / "absent")}}))
    for module in (trainer.launch, training):
        monkeypatch.setattr(module, "CONFIG_DIR", tmp_path / "configs")
        monkeypatch.setattr(module, "RUNS", tmp_path / "runs")
    text, start = training.pairs_status("first-run", "fresh.yaml")
    assert "No training pairs yet" in text and start["interactive"] is False
    with pytest.raises(gr.Error, match="prepare data first"):
        training.launch_training("vae-encoder", "fresh.yaml", "first-run", 0, 0, 0, 1, "no")
    monkeypatch.setattr(training, "TRAINING_ENABLED", False)
    text, start = training.pairs_status("first-run", "fresh.yaml")
    assert "disabled on this public server" in text and start["interactive"] is False
    for call in (lambda: training.launch_training("vae-encoder", "fresh.yaml", "first-run", 0, 0, 0, 1, "no"), training.stop_training,
                 lambda: training.prepare_data("first-run", "fresh.yaml", training.SOURCES[0], None, "", 1)):
        with pytest.raises(gr.Error, match="Training is disabled"):
            call()


# ------------------------------------------------------------------------------------ the running app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MEMORY_CAP = 12 * 2**30  # the server's address space (ulimit -v): a 4000x1 PNG asked 12.6 GB for its first tensor


def cap_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def start_app(root: Path, models: Path, **extra_env) -> dict:
    """`python app.py` under a memory cap, with tiny models, the configs in root/configs and its own runs and outputs."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "GRADIO_TEMP_DIR"}, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False",
        "TINYSR_MODEL": str(models / "tinysr"), "TSDSR_MODEL": str(models / "tsdsr"), "TINYSR_MAX_PIXELS": str(200 * 200),
        "TINYSR_CONFIG_DIR": str(root / "configs"), "TINYSR_RUNS_DIR": str(root / "runs"), "TINYSR_DATA_ROOTS": str(root),
        "TINYSR_OUTPUTS_DIR": str(root / "outputs"), "TINYSR_OUTPUTS_MB": "2", **extra_env,
    }
    log = open(root / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=cap_memory)
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
    return {"url": url, "root": root, "proc": proc, "log": log}


def stop_app(server: dict) -> None:
    if server["proc"].poll() is None:
        server["proc"].terminate()
        server["proc"].wait(30)
    server["log"].close()


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """The app with a tiny training config (every chain stage; vae-encoder long enough to watch and stop)."""
    root = tmp_path_factory.mktemp("app-server")
    pairs = root / "pairs"
    for sub in ("gt", "lq"):
        (pairs / sub).mkdir(parents=True)
    for i in range(4):
        save_rgb(pairs / "gt" / f"p{i}.png", 128, 128, seed=i)
        Image.open(pairs / "gt" / f"p{i}.png").resize((32, 32), Image.BICUBIC).save(pairs / "lq" / f"p{i}.png")
    (root / "configs").mkdir()
    small = {"batch_size": 2, "lora_rank": 4, "log_every": 1, "lr": 1e-3}
    config = {
        "name": "tiny", "teacher": str(models / "tsdsr"), "tiny_vae": {"channels": 8, "blocks_per_stage": 1},
        "data": {"pairs": str(pairs), "crop": 64},
        "stages": {
            "vae-encoder": {**small, "steps": 100000, "w_mse": 1.0}, "vae-decoder": {**small, "w_l1": 1.0}, "cache": {"batch_size": 2},
            "prune-search": {**small, "w_l1": 1.0}, "prune-export": {}, "distill-1": {**small, "w_l1": 1.0},
            "distill-2": {**small, "w_l1": 1.0}, "export": {},
        },
    }
    (root / "configs" / "tiny.yaml").write_text(yaml.safe_dump(config))
    app = start_app(root, models)
    yield app
    stop_app(app)


@pytest.fixture(scope="module")
def hosted_server(models, tmp_path_factory):
    """The app as a public Space would run it (training off)."""
    root = tmp_path_factory.mktemp("app-hosted")
    (root / "configs").mkdir()
    (root / "configs" / "tiny.yaml").write_text(yaml.safe_dump({"teacher": str(models / "tsdsr"), "data": {"pairs": str(root)}}))
    app = start_app(root, models, TINYSR_PUBLIC="1")
    yield app
    stop_app(app)


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


def server_rss(server) -> int:
    import psutil

    return psutil.Process(server["proc"].pid).memory_info().rss


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_thin_tiny_and_hostile_images_answer_in_seconds(client, server, tmp_path):
    """Each answers within 20 s with a 4x result or a sentence of ours; the server stays up at its memory."""
    from gradio_client import handle_file

    before = server_rss(server)
    for w, h in ((2000, 1), (1, 2000), (1024, 8), (1, 1)):
        path = tmp_path / f"thin-{w}x{h}.png"
        Image.new("RGB", (w, h), (120, 80, 40)).save(path)
        start = time.time()
        slider, rep_l, rep_r, *_ = client.predict(handle_file(str(path)), "tinysr", "tsdsr", api_name="/compare")
        took = time.time() - start
        assert Image.open(slider[0]).size == Image.open(slider[1]).size == (4 * w, 4 * h)
        assert took < 20, f"{w}x{h}: {took:.1f} s"
        print(f"{w}x{h}: answered in {took:.1f} s")
    (tmp_path / "lie.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG signature over nothing
    with pytest.raises(Exception, match="corrupt or truncated|not an image"):
        client.predict(handle_file(str(tmp_path / "lie.png")), "tinysr", "tsdsr", api_name="/compare")
    with pytest.raises(Exception, match=r"processed at 1024000x512 = 524 MP by the official recipe .* the limit is 2.1 MP"):
        client.predict(handle_file(str(tmp_path / "thin-2000x1.png")), "tinysr", "bicubic", "model default", 32, 8, "fp32", None,
                       "left | right", "official", api_name="/compare")
    assert server["proc"].poll() is None
    assert server_rss(server) - before < 300 * 2**20


def test_upscale_endpoint_one_image_one_model(client, tmp_path):
    from gradio_client import handle_file

    path = save_rgb(tmp_path / "in.png", 24, 32)
    out, report = client.predict(handle_file(path), api_name="/upscale")
    assert Image.open(out).size == (128, 96) and "TinySR" in report and "Latency" in report
    out, report = client.predict(handle_file(path), "bicubic", api_name="/upscale")
    assert Image.open(out).size == (128, 96) and "Bicubic" in report
    with pytest.raises(Exception, match="Unknown model 'esrgan'"):
        client.predict(handle_file(path), "esrgan", api_name="/upscale")


def test_benchmark_reads_only_allowed_folders_or_an_upload(client, server, tmp_path):
    import zipfile

    from gradio_client import handle_file

    args = (["bicubic"], ["psnr"], 2)
    for folder, why in (("/etc", "outside the folders"), (str(server["root"] / ".." / ".."), "contains '..'"), (str(server["root"] / "absent"), "not a folder")):
        with pytest.raises(Exception, match=why):
            client.predict(folder, "", *args, None, api_name="/benchmark")
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        for name in ("p0.png", "p1.png"):
            z.write(server["root"] / "pairs" / "lq" / name, f"lr/{name}")
            z.write(server["root"] / "pairs" / "gt" / name, f"gt/{name}")
    table, _, summary = client.predict("/etc", "", *args, [handle_file(str(tmp_path / "set.zip"))], api_name="/benchmark")
    assert "2 images from 2 uploaded images with ground truth" in summary and table["data"][0][0] == "Bicubic"


def test_four_clients_a_hundred_requests(client, server, tmp_path):
    """4 clients at once, 140 requests in all: every one answered; the outputs folder stays under its cap
    (2 MB here) and the server's memory grows less than 250 MB from the 20th to the 140th request. That
    catches a leak of 2 MB a request; the allocator's arenas alone grew up to 134 MB in one 40-request window."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    path = save_rgb(tmp_path / "in.png", 20, 20)  # NIQE refuses the 80 px output at once: requests stay cheap
    outputs = server["root"] / "outputs"  # our results and gradio's cache (uploads, served copies, the examples)
    (outputs / "earlier-visitors.png").write_bytes(os.urandom(3 * 2**20))  # the folder is past its cap

    def requests(i, count):
        c = Client(server["url"], verbose=False)
        return [Image.open(c.predict(handle_file(path), ["tinysr", "bicubic"][i % 2], api_name="/upscale")[0]).size for _ in range(count)]

    rss = []
    with ThreadPoolExecutor(4) as pool:
        for count in (5, 20, 10):
            sizes = [s for batch in pool.map(requests, range(4), [count] * 4) for s in batch]
            assert sizes == [(80, 80)] * 4 * count
            rss.append(server_rss(server))
    time.sleep(2.5)  # files younger than 2 s are never trimmed: a response may still be sending them
    client.predict(handle_file(path), "tinysr", api_name="/upscale")
    assert folder_bytes(outputs) < 2 * 2**20 + 2**20, folder_bytes(outputs)
    config = json.loads(urllib.request.urlopen(server["url"] + "config").read())
    examples = [f for f in common.page_files(config) if f["path"].startswith(str(outputs))]  # gradio's copies, the oldest files there
    assert len(examples) == 4 and all(urllib.request.urlopen(f["url"]).status == 200 for f in examples), examples
    assert rss[1] - rss[0] < 250 * 2**20, rss


def test_prepare_data_then_the_whole_chain_from_the_tab(client, server):
    message = client.predict("prep-run", "tiny.yaml", "the example photos", None, "", 2, api_name="/prepare_data")
    assert "Wrote 8 pairs (64 px ground truth, 16 px input) from 4 photos" in message
    message = client.predict("all", "tiny.yaml", "prep-run", 2, 0, 0, 1, "no", api_name="/train_start")
    assert "trainer all" in message and "prep-run/pairs" in message
    deadline = time.time() + 600
    while time.time() < deadline:
        status, *_ = client.predict(api_name="/train_status")
        if "running" not in status:
            break
        time.sleep(3)
    run = server["root"] / "runs" / "prep-run"
    assert "finished" in status, status + (run / "console.log").read_text()[-3000:]
    assert (run / "export" / "model_index.json").is_file()
    assert TinySRPipeline.from_pretrained(run / "export")(random_image(16, 16)).image.shape == (3, 64, 64)


def test_hosted_mode_refuses_training(hosted_server):
    from gradio_client import Client

    c = Client(hosted_server["url"], verbose=False)
    with pytest.raises(Exception, match="Training is disabled"):
        c.predict("vae-encoder", "tiny.yaml", "visitor", 0, 0, 0, 1, "no", api_name="/train_start")
    with pytest.raises(Exception, match="Training is disabled"):
        c.predict("visitor", "tiny.yaml", "the example photos", None, "", 1, api_name="/prepare_data")
    assert not (hosted_server["root"] / "runs").exists()


def test_training_endpoints_launch_refuse_a_second_job_and_stop(client, server):
    message = client.predict("vae-encoder", "tiny.yaml", "api-run", 0, 0, 0, 1, "no", api_name="/train_start")
    assert "trainer vae-encoder" in message
    with pytest.raises(Exception, match="already running"):
        client.predict("vae-encoder", "tiny.yaml", "api-run-2", 0, 0, 0, 1, "no", api_name="/train_start")
    with pytest.raises(Exception, match="Run name: 1-64"):
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
def test_browser_upload_compare_prepare_and_train(server, hosted_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.goto(server["url"])
        # the examples' thumbnails are gradio's copies in the outputs folder, which earlier tests filled past its cap
        page.wait_for_function("() => { const im = [...document.querySelectorAll('#examples img')];"
                               " return im.length === 4 && im.every(i => i.complete && i.naturalWidth > 0) }", timeout=30_000)
        page.locator("#lr-input input[type=file]").set_input_files(str(ROOT / "assets" / "examples" / "copy_centre.png"))
        page.get_by_role("button", name="Upscale x4").click()
        expect(page.locator("#report-left")).to_contain_text("Latency", timeout=180_000)
        expect(page.locator("#report-right")).to_contain_text("NIQE", timeout=60_000)
        expect(page.locator("#comparison img").first).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "app_upscale.png"), full_page=True)
        first = page.locator("#comparison img").first.get_attribute("src")
        page.get_by_label("bicubic | left").check()  # the other views come from the files of this comparison
        expect(page.locator("#comparison img").first).not_to_have_attribute("src", first, timeout=30_000)
        page.locator("#lr-input input[type=file]").set_input_files(save_rgb(tmp_path / "small.png", 48, 40))
        page.get_by_text("Advanced").click()
        page.get_by_label("official").check()
        page.get_by_role("button", name="Upscale x4").click()
        expect(page.locator("#report-left")).to_contain_text("Recipe: official", timeout=180_000)
        expect(page.locator("#report-right")).to_contain_text("Recipe: official", timeout=60_000)

        page.get_by_role("tab", name="Training").click()
        page.get_by_label("Run name").fill("browser-run")
        page.get_by_label("Random crops per photo").fill("1")
        page.get_by_role("button", name="Prepare data", exact=True).click()
        expect(page.locator("#prepare-message")).to_contain_text("Wrote 4 pairs", timeout=60_000)
        expect(page.locator("#train-pairs")).to_contain_text("4 training pairs")
        expect(page.get_by_role("button", name="Start", exact=True)).to_be_enabled()
        page.get_by_role("button", name="Start", exact=True).click()
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

        hosted = browser.new_page(viewport={"width": 1400, "height": 1200})
        hosted.goto(hosted_server["url"])
        hosted.get_by_role("tab", name="Training").click()
        expect(hosted.locator("#train-disabled")).to_contain_text("Training is disabled on this public server")
        expect(hosted.get_by_role("button", name="Start", exact=True)).to_be_disabled()
        expect(hosted.get_by_role("button", name="Prepare data", exact=True)).to_be_disabled()
        hosted.screenshot(path=str(ARTIFACTS / "app_hosted_training.png"), full_page=True)
        browser.close()
    assert server["proc"].poll() is None


def test_stopping_the_app_stops_its_training_job(client, server):
    """A job runs in a session of its own; the app stops it when it is itself stopped (SIGTERM), leaving no orphan."""
    import psutil

    client.predict("vae-encoder", "tiny.yaml", "left-running", 0, 0, 0, 1, "no", api_name="/train_start")
    deadline = time.time() + 60
    while not (jobs := [p for p in psutil.process_iter(["cmdline"]) if "name=left-running" in " ".join(p.info["cmdline"] or [])]):
        assert time.time() < deadline, "the job did not start"
        time.sleep(0.5)
    server["proc"].terminate()
    assert server["proc"].wait(30) == 0
    gone, alive = psutil.wait_procs(jobs, timeout=30)
    assert not alive, [p.info["cmdline"] for p in alive]


def test_about_shows_the_pruning_decision_of_the_model_in_use(tmp_path, monkeypatch):
    import json

    from trainer.stages.pruning import BlockMaskSampler

    sampler = BlockMaskSampler(8, 4, 2, couple_pairs=True)
    (tmp_path / "pruning.json").write_text(json.dumps(sampler.decision()))
    monkeypatch.setenv("TINYSR_MODEL", str(tmp_path))
    text = about.about_markdown()
    assert "4 of 8 teacher blocks kept" in text
    assert "| group 0 | ■ ■ □ □ | 0, 1 |" in text and "| group 1 | ■ ■ □ □ | 4, 5 |" in text  # zero logits: first candidates
    assert "bench-paper-h200.json" in text and "TSD-SR / TinySR" in text


def test_about_and_benchmark_show_what_the_bundled_weights_scored(tmp_path, monkeypatch):
    import json

    metrics = {"synthetic": {"bicubic": {"psnr": 21.919, "ssim": 0.5591, "niqe": 9.97, "st_lpips": 0.5471},
                             "tinysr": {"psnr": 21.5, "ssim": 0.56, "niqe": 8.0, "st_lpips": 0.4987, "st_lpips_vgg": 0.4123, "lattice": 1.234, "blockiness": 0.93}}}
    (tmp_path / "demo_metrics.json").write_text(json.dumps({"metrics": metrics}))
    monkeypatch.setattr(about, "DEMO_METRICS", tmp_path / "demo_metrics.json")
    text = about.about_markdown()
    assert "| Bicubic | 21.92 | 0.5591 | 0.5471 | - | 9.970 | - | - |" in text
    assert "| TinySR (demo scale, bundled) | 21.50 | 0.5600 | 0.4987 | 0.4123 | 8.000 | 1.23 | 0.93 |" in text
    monkeypatch.setattr(about, "DEMO_METRICS", tmp_path / "absent.json")
    assert "absent.json is missing" in about.demo_quality_markdown()
