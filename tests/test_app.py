import gradio as gr
import pytest
from PIL import Image

import app


def test_compare_tinysr_with_bicubic(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSR_MODEL", str(tiny_folder))
    app.get_pipeline.cache_clear()
    path = tmp_path / "in.png"
    Image.new("RGB", (24, 16), (120, 60, 30)).save(path)
    (left, right), info_left, info_right = app.compare(str(path), "tinysr", "bicubic", "model default")
    assert left.size == right.size == (96, 64)
    assert "transformer" in info_left and info_right == "bicubic x4"
    assert isinstance(app.build_demo(), gr.Blocks)


def test_missing_weights_and_bad_upload_are_readable(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSR_MODEL", str(tmp_path / "absent"))
    app.get_pipeline.cache_clear()
    path = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(gr.Error, match="missing weights"):
        app.compare(str(path), "tinysr", "bicubic", "adain")
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(gr.Error, match="not an image"):
        app.compare(str(tmp_path / "bad.png"), "bicubic", "bicubic", "adain")
