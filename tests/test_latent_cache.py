import json

import numpy as np
import pytest
import torch
from PIL import Image

from tinysr import TSDSRPipeline
from tinysr.errors import ImageError
from tinysr.latent_cache import LatentCacheDataset, build_latent_cache, encode_pair

from .conftest import make_kl, make_sd3


@pytest.fixture
def teacher():
    return TSDSRPipeline(make_sd3(seed=8), make_kl(seed=8), torch.randn(5, 32), torch.randn(24))


@pytest.fixture
def pairs(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("gt", "lq"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
    for i in range(5):
        gt = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        gt.save(tmp_path / "pairs" / "gt" / f"p{i}.png")
        gt.resize((16, 16), Image.BICUBIC).save(tmp_path / "pairs" / "lq" / f"p{i}.png")
    return tmp_path / "pairs"


def test_cache_round_trip_and_resume(teacher, pairs, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    index = build_latent_cache(teacher, pairs, out, shard_size=2, dtype=torch.float32, progress=False)
    assert [len(s["names"]) for s in index["shards"]] == [2, 2, 1]
    ds = LatentCacheDataset(out)
    assert len(ds) == 5
    item = ds[3]
    assert item["name"] == "p3.png" and item["lq"].shape == (16, 8, 8)
    expected = encode_pair(teacher, pairs / "lq" / "p3.png", pairs / "gt" / "p3.png")
    for key in ("lq", "hq", "teacher"):
        assert torch.allclose(item[key], expected[key], atol=1e-5)
    assert not torch.allclose(item["teacher"], item["lq"])

    # an interrupted run lost its last shard: only those pairs are encoded again
    index = json.loads((out / "index.json").read_text())
    index["shards"] = index["shards"][:1]
    (out / "index.json").write_text(json.dumps(index))
    calls = []
    real = encode_pair
    monkeypatch.setattr("tinysr.latent_cache.encode_pair", lambda *a: calls.append(a[1].name) or real(*a))
    build_latent_cache(teacher, pairs, out, shard_size=2, dtype=torch.float32, progress=False)
    assert calls == ["p2.png", "p3.png", "p4.png"]
    assert len(LatentCacheDataset(out)) == 5


def test_a_cache_of_another_teacher_setting_is_refused(teacher, pairs, tmp_path):
    """Resuming, or distilling from, latents cached with the token pattern in (or out) would mix two teachers."""
    from tinysr.errors import WrongModelError
    from tinysr.latent_cache import check_teacher_settings

    out = tmp_path / "cache"
    build_latent_cache(teacher, pairs, out, shard_size=2, dtype=torch.float32, progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["remove_token_pattern"] is False
    teacher.remove_token_pattern = True
    with pytest.raises(WrongModelError, match="cached by a teacher with .*'remove_token_pattern': False.* delete the cache"):
        build_latent_cache(teacher, pairs, out, shard_size=2, dtype=torch.float32, progress=False)
    del index["remove_token_pattern"]  # caches written before the option: built without it
    with pytest.raises(WrongModelError, match="delete the cache"):
        check_teacher_settings(index, teacher, out / "index.json")
    teacher.remove_token_pattern = False
    check_teacher_settings(index, teacher, out / "index.json")
    with pytest.raises(WrongModelError, match="scaling_factor"):
        check_teacher_settings({**index, "scaling_factor": 2.0}, teacher, out / "index.json")


def test_bad_pairs(teacher, tmp_path, pairs):
    with pytest.raises(ImageError, match="no lq/ and gt/"):
        build_latent_cache(teacher, tmp_path / "empty", tmp_path / "c", progress=False)
    Image.new("RGB", (10, 10)).save(pairs / "lq" / "p0.png")
    with pytest.raises(ImageError, match="is not 4x"):
        build_latent_cache(teacher, pairs, tmp_path / "c", progress=False)


def test_cache_cli(teacher, pairs, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder = teacher.save_pretrained(tmp_path / "teacher")
    r = subprocess.run(
        [sys.executable, "-m", "tinysr", "cache", str(pairs), "-o", str(tmp_path / "c"), "--model", str(folder), "--shard-size", "4"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "5 pairs in 2 shards" in r.stdout
