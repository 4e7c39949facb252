import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import special

from tinysr.degradation import (
    KERNEL_TYPES,
    DegradationConfig,
    RealESRGANDegradation,
    anisotropic_gaussian_kernel,
    degrade_folder,
    generalized_gaussian_kernel,
    isotropic_gaussian_kernel,
    plateau_kernel,
    random_crop,
    random_kernel,
    sinc_kernel,
    usm_sharp,
)

from .conftest import random_image

C = 10  # centre of a 21 x 21 kernel
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def ratio(kernel, dy, dx):
    return kernel[C + dy, C + dx] / kernel[C, C]


@pytest.mark.parametrize(
    "kernel",
    [
        isotropic_gaussian_kernel(21, 2.0),
        anisotropic_gaussian_kernel(21, 3.0, 0.7, 0.6),
        generalized_gaussian_kernel(21, 2.0, 1.0, -1.1, 0.5),
        generalized_gaussian_kernel(21, 1.5, 1.5, 0.0, 3.0),
        plateau_kernel(21, 2.5, 1.0, 2.0, 1.5),
        sinc_kernel(21, math.pi / 4),
        sinc_kernel(7, math.pi / 2, pad_to=21),
    ],
)
def test_kernel_sums_to_one_and_is_point_symmetric(kernel):
    assert kernel.shape == (21, 21)
    assert abs(kernel.sum() - 1) < 1e-6
    assert np.allclose(kernel, np.rot90(kernel, 2))


def test_gaussian_kernels_match_closed_form():
    k = isotropic_gaussian_kernel(21, 2.0)
    for dy, dx in [(0, 3), (1, 2), (-4, 4)]:
        assert ratio(k, dy, dx) == pytest.approx(math.exp(-(dy**2 + dx**2) / (2 * 2.0**2)))
    k = anisotropic_gaussian_kernel(21, 3.0, 1.0, 0.0)
    assert ratio(k, 0, 2) == pytest.approx(math.exp(-4 / 18))  # x (columns) has sigma_x
    assert ratio(k, 2, 0) == pytest.approx(math.exp(-4 / 2))
    assert np.allclose(anisotropic_gaussian_kernel(21, 3.0, 1.0, math.pi / 2), anisotropic_gaussian_kernel(21, 1.0, 3.0, 0.0))
    rotated = anisotropic_gaussian_kernel(21, 3.0, 1.0, 0.6)
    assert not np.allclose(rotated, rotated.T)


def test_generalized_and_plateau_kernels_match_closed_form():
    assert np.allclose(generalized_gaussian_kernel(21, 3.0, 1.0, 0.4, 1.0), anisotropic_gaussian_kernel(21, 3.0, 1.0, 0.4))
    k = generalized_gaussian_kernel(21, 2.0, 2.0, 0.0, 2.0)
    assert ratio(k, 0, 3) == pytest.approx(math.exp(-0.5 * (9 / 4) ** 2))
    k = plateau_kernel(21, 2.0, 2.0, 0.0, 1.5)
    assert ratio(k, 3, 4) == pytest.approx(1 / ((25 / 4) ** 1.5 + 1))  # centre value is 1 / (0 + 1)


def test_sinc_kernel_matches_bessel_formula():
    cutoff = 2.0
    k = sinc_kernel(13, cutoff, pad_to=21)
    centre = cutoff**2 / (4 * math.pi)
    for dy, dx in [(0, 1), (2, 3), (-5, 1)]:
        r = math.hypot(dy, dx)
        assert ratio(k, dy, dx) == pytest.approx(cutoff * special.j1(cutoff * r) / (2 * math.pi * r) / centre)
    assert np.all(k[:4] == 0) and np.all(k[:, -4:] == 0)


def test_random_kernel_is_seeded_and_checks_the_stage():
    cfg = DegradationConfig(sinc_prob=0.0, kernel_types=("plateau_aniso",), kernel_probs=(1.0,))
    a, b = random_kernel(7, cfg, 1), random_kernel(np.random.default_rng(7), cfg, 1)
    assert a.kind == "plateau_aniso" and a.params == b.params and np.array_equal(a.kernel, b.kernel)
    assert random_kernel(7, DegradationConfig(sinc_prob2=1.0), 2).kind == "sinc"
    with pytest.raises(ValueError, match="stage"):
        random_kernel(7, cfg, 3)


def test_usm_sharpens_edges_only():
    flat = torch.full((3, 32, 32), 0.4)
    assert torch.allclose(usm_sharp(flat), flat)
    step = torch.zeros(3, 32, 32)
    step[:, :, 16:] = 0.8
    out = usm_sharp(step)
    assert out.min() >= 0 and out.max() <= 1
    assert out[:, :, 16].mean() > 0.8  # overshoot on the bright side of the edge
    assert out[:, :, 15].mean() < 0.8 and torch.equal(out[:, :, 15], torch.zeros_like(out[:, :, 15]))  # clipped at 0


def test_same_seed_same_pair_and_different_seed_differs():
    degrade, hr = RealESRGANDegradation(), random_image(64, 64)
    a, b, c = degrade(hr, 3), degrade(hr, np.random.default_rng(3)), degrade(hr, 4)
    for name in ("gt", "lq", "lq_up"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.lq, c.lq)


def test_gt_is_usm_of_the_possibly_flipped_crop():
    degrade, hr = RealESRGANDegradation(), random_image(32, 32, seed=1)
    flips = set()
    for seed in range(4):
        pair = degrade(hr, seed)
        flips.add(pair.params["hflip"])
        assert torch.equal(pair.gt, usm_sharp(hr.flip(-1) if pair.params["hflip"] else hr))
    assert flips == {True, False}


def test_output_sizes_and_ranges_at_512():
    pair = RealESRGANDegradation()(random_image(512, 512, seed=2), 0)
    assert pair.gt.shape == (3, 512, 512) and pair.lq.shape == (3, 128, 128) and pair.lq_up.shape == (3, 512, 512)
    for t in (pair.gt, pair.lq, pair.lq_up):
        assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1
    assert torch.equal(pair.lq * 255, (pair.lq * 255).round())


def test_small_crops_and_wrong_sizes():
    degrade = RealESRGANDegradation()
    for seed in range(4):  # strong downscales shrink a 32 px crop to a few pixels; blur must still work
        assert degrade(random_image(32, 48), seed).lq.shape == (3, 8, 12)
    with pytest.raises(ValueError, match="multiple"):
        degrade(random_image(30, 32), 0)


def test_sampled_parameters_follow_the_config():
    cfg, degrade = DegradationConfig(), RealESRGANDegradation()
    rng = np.random.default_rng(0)
    draws = [degrade.sample_params(rng) for _ in range(200)]

    for stage, sigma_range in ((1, cfg.blur_sigma), (2, cfg.blur_sigma2)):
        kernels = [d[f"kernel{stage}"] for d in draws]
        assert all(k.size in cfg.kernel_sizes and k.kernel.shape == (21, 21) for k in kernels)
        assert all(abs(k.kernel.sum() - 1) < 1e-6 for k in kernels)
        sigmas = [k.params[n] for k in kernels if k.kind != "sinc" for n in ("sigma_x", "sigma_y")]
        assert sigma_range[0] <= min(sigmas) and max(sigmas) <= sigma_range[1]
        assert all(abs(k.params["theta"]) <= math.pi for k in kernels if k.kind != "sinc")
        assert all(k.params["theta"] == 0 for k in kernels if k.kind in ("iso", "generalized_iso", "plateau_iso"))
        for k in kernels:
            if k.kind.startswith("generalized"):
                assert cfg.betag_range[0] <= k.params["beta"] <= cfg.betag_range[1]
            if k.kind.startswith("plateau"):
                assert cfg.betap_range[0] <= k.params["beta"] <= cfg.betap_range[1]
            if k.kind == "sinc":
                assert (math.pi / 3 if k.size < 13 else math.pi / 5) <= k.params["cutoff"] <= math.pi
    kinds = Counter(d[f"kernel{s}"].kind for d in draws for s in (1, 2))
    assert 0.05 < kinds["sinc"] / 400 < 0.16
    assert 0.3 < kinds["iso"] / 400 < 0.5 and set(kinds) <= {*KERNEL_TYPES, "sinc"}
    finals = [d["final_kernel"] for d in draws]
    assert 0.7 < sum(k.kind == "sinc" for k in finals) / 200 < 0.9
    assert all(k.kind == "pulse" or math.pi / 3 <= k.params["cutoff"] <= math.pi for k in finals)

    resize = Counter(d["resize1"]["type"] for d in draws)
    assert 0.13 < resize["up"] / 200 < 0.27 and 0.6 < resize["down"] / 200 < 0.8 and 0.04 < resize["keep"] / 200 < 0.16
    for stage, (lo, hi) in ((1, cfg.resize_range), (2, cfg.resize_range2)):
        scales = [d[f"resize{stage}"] for d in draws]
        assert all(1 <= r["scale"] <= hi for r in scales if r["type"] == "up")
        assert all(lo <= r["scale"] <= 1 for r in scales if r["type"] == "down")
    assert {d["resize1"]["mode"] for d in draws} == {"area", "bilinear", "bicubic"}

    for stage, sigma_range, poisson_range in ((1, cfg.noise_range, cfg.poisson_scale_range), (2, cfg.noise_range2, cfg.poisson_scale_range2)):
        noise = [d[f"noise{stage}"] for d in draws]
        sigmas = [n["sigma"] for n in noise if n["type"] == "gaussian"]
        scales = [n["scale"] for n in noise if n["type"] == "poisson"]
        assert sigma_range[0] <= min(sigmas) and max(sigmas) <= sigma_range[1]
        assert poisson_range[0] <= min(scales) and max(scales) <= poisson_range[1]
        assert 0.4 < len(sigmas) / 200 < 0.6 and 0.3 < sum(n["gray"] for n in noise) / 200 < 0.5
    qualities = [d[k] for d in draws for k in ("jpeg1", "jpeg2")]
    assert 30 <= min(qualities) and max(qualities) <= 95
    assert 0.7 < sum(d["blur2"] for d in draws) / 200 < 0.9
    assert 0.4 < sum(d["resize_before_jpeg"] for d in draws) / 200 < 0.6


def test_random_crop_pads_small_photos():
    small = random_image(40, 50)
    crop = random_crop(small, 64, 0)
    assert crop.shape == (3, 64, 64) and torch.equal(crop[:, :40, :50], small)
    big = random_image(100, 120)
    crops = {tuple(random_crop(big, 64, s)[:, 0, 0].tolist()) for s in range(5)}
    assert len(crops) > 1


def save_photo(path, h, w, seed):
    arr = (random_image(h, w, seed).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(path)


def test_degrade_folder_writes_reproducible_pairs_and_skips_bad_files(tmp_path):
    hr = tmp_path / "hr"
    hr.mkdir()
    save_photo(hr / "a.png", 150, 170, 0)
    save_photo(hr / "b.jpg", 100, 140, 1)  # smaller than the crop: padded
    (hr / "broken.png").write_bytes(b"not a png")
    (hr / "notes.txt").write_text("not a photo")

    with pytest.warns(UserWarning, match="broken.png"):
        assert degrade_folder(hr, tmp_path / "out1", seed=5, crop=128, per_image=2, progress=False) == 4
    names = sorted(p.name for p in (tmp_path / "out1" / "gt").iterdir())
    assert names == ["a_0.png", "a_1.png", "b_0.png", "b_1.png"]
    assert sorted(p.name for p in (tmp_path / "out1" / "lq").iterdir()) == names
    for name in names:
        assert Image.open(tmp_path / "out1" / "gt" / name).size == (128, 128)
        assert Image.open(tmp_path / "out1" / "lq" / name).size == (32, 32)

    alone = tmp_path / "alone"  # same seed, other folder contents: a pair depends only on (seed, name, k)
    alone.mkdir()
    shutil.copy(hr / "b.jpg", alone / "b.jpg")
    degrade_folder(alone, tmp_path / "out2", seed=5, crop=128, progress=False)
    for sub in ("gt", "lq"):
        assert (tmp_path / "out1" / sub / "b_0.png").read_bytes() == (tmp_path / "out2" / sub / "b_0.png").read_bytes()
    degrade_folder(alone, tmp_path / "out3", seed=6, crop=128, progress=False)
    assert (tmp_path / "out3" / "lq" / "b_0.png").read_bytes() != (tmp_path / "out2" / "lq" / "b_0.png").read_bytes()
    assert not list(tmp_path.rglob("*.part"))


def test_sample_sheet_of_real_photos():
    """Writes test-artifacts/degradation_sheet.png for a person to judge: LQ (nearest-upscaled) | GT, one pair a row."""
    skimage_data = pytest.importorskip("skimage.data")
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(), skimage_data.astronaut()]
    degrade, rows = RealESRGANDegradation(), []
    for seed, photo in enumerate(photos):
        rng = np.random.default_rng(seed)
        hr = random_crop(torch.from_numpy(photo).permute(2, 0, 1).float() / 255, 256, rng)
        pair = degrade(hr, rng)
        lq = torch.nn.functional.interpolate(pair.lq[None], scale_factor=4, mode="nearest")[0]
        rows.append(torch.cat([lq, pair.gt], dim=2))
    sheet = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(sheet).save(ARTIFACTS / "degradation_sheet.png")
    assert sheet.shape == (1024, 512, 3)


def test_degrade_cli_keeps_same_stem_photos_apart(tmp_path):
    import os
    import subprocess
    import sys

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(photos / "a.png")
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(photos / "a.jpg")
    r = subprocess.run(
        [sys.executable, "-m", "tinysr", "degrade", str(photos), "-o", str(tmp_path / "pairs"), "--crop", "64", "--per-image", "2"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "wrote 4 pairs" in r.stdout
    assert sorted(p.name for p in (tmp_path / "pairs" / "lq").iterdir()) == ["a_jpg_0.png", "a_jpg_1.png", "a_png_0.png", "a_png_1.png"]
    assert Image.open(tmp_path / "pairs" / "lq" / "a_png_0.png").size == (16, 16)
