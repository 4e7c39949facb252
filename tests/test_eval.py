"""The evaluation reproduces the metrics that OSEDiff's authors logged for their published outputs."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinysr.errors import ImageError
from tinysr.evaluate import evaluate_folders, format_table, pair_files
from tinysr.metrics import MetricSuite

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ["RealSRVal_crop128", "DrealSRVal_crop128"]
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")


def osediff_log(dataset: str) -> dict:
    """Per-image metrics from the OSEDiff authors' log, lower-case names."""
    text = next((DATA / dataset / "results_osediff" / "metrics").glob("*.log")).read_text()
    per_image = {}
    for name, fields in re.findall(r"results_osediff/(\S+\.png) \| (.*)", text):
        per_image[name] = {k.lower(): float(v) for k, v in re.findall(r"(\w+): ([\d.]+)", fields)}
    return per_image


@needs_data
@pytest.mark.parametrize("dataset", SETS)
def test_osediff_outputs_reproduce_logged_metrics(dataset, tmp_path):
    """Every 4th image of each set (25 of ~100: pyiqa's float64 SSIM costs ~1 s per image here), per image and averaged."""
    per_image = osediff_log(dataset)
    names = sorted(per_image)[::4]
    for kind, folder in (("pred", "results_osediff"), ("gt", "test_HR")):
        (tmp_path / kind).mkdir()
        for name in names:
            shutil.copy(DATA / dataset / folder / name, tmp_path / kind / name)
    result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", metrics=["psnr", "ssim", "niqe"], progress=False)
    assert result["count"] == len(names) >= 20 and len(per_image) >= 90
    for metric in ("psnr", "ssim", "niqe"):
        logged = sum(per_image[n][metric] for n in names) / len(names)
        assert result["average"][metric] == pytest.approx(logged, abs=0.01 if metric == "niqe" else 1e-4)
    for row in result["per_image"]:
        ref = per_image[row["image"]]
        assert abs(row["psnr"] - ref["psnr"]) < 1e-4 and abs(row["ssim"] - ref["ssim"]) < 1e-5
        assert abs(row["niqe"] - ref["niqe"]) < 0.05
    print(format_table({f"OSEDiff {dataset} (every 4th image)": result}))


def test_metrics_without_weights_are_reported_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setattr("tinysr.metrics.torch_hub_dir", lambda: tmp_path)
    suite = MetricSuite(["psnr", "lpips", "musiq"], allow_download=False)
    import torch

    x = torch.rand(1, 3, 32, 32)
    scores = suite.score(x, x)
    assert scores == {"psnr": pytest.approx(80, abs=1)}  # pyiqa's eps caps identical images
    assert "LPIPS_v0.1_alex-df73285e.pth" in suite.unavailable["lpips"] and str(tmp_path) in suite.unavailable["lpips"]
    assert "musiq_koniq_ckpt" in suite.unavailable["musiq"]
    with pytest.raises(ValueError, match="unknown metrics"):
        MetricSuite(["psnr", "sharpness"])


@needs_data
def test_eval_cli_writes_json_and_csv(tmp_path):
    src = DATA / "RealSRVal_crop128"
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    names = sorted(p.name for p in (src / "results_osediff").glob("*.png"))[:3]
    for n in names:
        shutil.copy(src / "results_osediff" / n, pred / n)
        shutil.copy(src / "test_HR" / n, gt / n)
    out_json, out_csv = tmp_path / "m.json", tmp_path / "m.csv"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "tinysr", "eval", "--pred", pred, "--gt", gt, "--metrics", "psnr,ssim,niqe,lpips", "--json", out_json, "--csv", out_csv],
        cwd=root, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(out_json.read_text())
    assert list(result["average"]) == ["psnr", "ssim", "niqe"]
    assert [row["image"] for row in result["per_image"]] == names
    assert "lpips" in result["unavailable"]
    assert out_csv.read_text().splitlines()[0] == "image,psnr,ssim,niqe"
    assert "PSNR^" in r.stdout and "lpips unavailable" in r.stdout


def test_pairing_refuses_unmatched(tmp_path):
    from PIL import Image

    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "p" / "a.png")
    with pytest.raises(ImageError, match="no ground truth"):
        pair_files(tmp_path / "p", tmp_path / "g")


def small_set(tmp_path, n=4):
    src = DATA / "RealSRVal_crop128"
    lr, gt = tmp_path / "lr", tmp_path / "gt"
    lr.mkdir()
    gt.mkdir()
    for name in sorted(p.name for p in (src / "test_LR").glob("*.png"))[:n]:
        shutil.copy(src / "test_LR" / name, lr / name)
        shutil.copy(src / "test_HR" / name, gt / name)
    return lr, gt


@needs_data
def test_eval_runs_a_model_first_split_over_two_processes(tmp_path):
    """Two processes under accelerate (one process: test_cli's official-recipe eval)."""
    lr, gt = small_set(tmp_path)
    args = ["-m", "tinysr", "eval", "--model", "bicubic", "--lr", lr, "--gt", gt, "--out", tmp_path / "sr", "--metrics", "psnr,ssim", "--json", tmp_path / "m.json"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    r = subprocess.run([*launcher, *map(str, args)], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["count"] == 4 and len(list((tmp_path / "sr").glob("*.png"))) == 4
    direct = evaluate_folders(tmp_path / "sr", gt, metrics=["psnr", "ssim"], progress=False)
    assert result["average"] == pytest.approx(direct["average"])
    assert "bicubic: 4 images" in r.stderr


@needs_data
@pytest.mark.parametrize("period", [16, 8, 4])
def test_lattice_score_is_about_one_on_photos_and_high_on_a_grid(period):
    """The artefact score of the demo-weights issue: a faint dot grid on a real photo stands out, the photo does not."""
    from tinysr.imageio import load_image
    from tinysr.metrics import lattice_score

    photo = load_image(DATA / "RealSRVal_crop128" / "test_HR" / "Canon_001_LR4.png").rgb
    assert 0.8 < lattice_score(photo) < 1.3
    dotted = photo.clone()
    dotted[:, ::period, ::period] = (dotted[:, ::period, ::period] + 0.05).clamp(0, 1)
    assert lattice_score(dotted) > 3
    with pytest.raises(ValueError, match="32x32"):
        lattice_score(photo[:, :20, :20])


@needs_data
def test_blockiness_is_about_one_on_photos_and_high_when_edges_step_by_cells():
    """Blocks that change from cell to cell (a patch decoder's errors) leave the lattice score low; this sees them."""
    import torch.nn.functional as F

    from tinysr.imageio import load_image
    from tinysr.metrics import blockiness

    photo = load_image(DATA / "RealSRVal_crop128" / "test_HR" / "Canon_001_LR4.png").rgb[:, :256, :256]
    assert 0.9 < blockiness(photo) < 1.15
    cells = F.interpolate(F.avg_pool2d(photo[None], 4), scale_factor=4, mode="nearest")[0]
    blocky = (photo + cells) / 2
    assert blockiness(blocky) > 1.5
    assert blockiness(blocky.roll(2, dims=-1)) < blockiness(blocky)  # blocks off the 4-px grid are not the decoder's
    with pytest.raises(ValueError, match="8x8"):
        blockiness(photo[:, :6, :6])
