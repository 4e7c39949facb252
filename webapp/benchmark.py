"""The Benchmark tab: models x metrics over a server folder under the allowed roots, or over an upload."""

import shutil
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from tinysr.errors import TinySRError
from tinysr.evaluate import evaluate_folders, upscale_folder
from tinysr.imageio import list_images
from tinysr.metrics import MetricSuite

from .common import MAX_PIXELS, OUTPUTS, TITLES, get_pipeline, sentences
from .paths import SHARED_DATA, allowed_folder, unpack_upload

MAX_IMAGES = 100  # per run: the work is bounded by what will be computed


def default_bench_folders() -> tuple[str, str]:
    realsr = SHARED_DATA / "RealSRVal_crop128"
    if (realsr / "test_LR").is_dir():
        return str(realsr / "test_LR"), str(realsr / "test_HR")
    return "", ""


@sentences
def run_bench(lr_dir, gt_dir, models, metrics, max_images, uploads=None, progress=gr.Progress()):
    """An upload (images, or a zip with lr/ and gt/) wins over the folders typed in."""
    if not models or not metrics:
        raise gr.Error("Choose at least one model and one metric.")
    count = int(max_images or 0)
    if not 1 <= count <= MAX_IMAGES:
        raise gr.Error(f"Images: choose between 1 and {MAX_IMAGES}.")
    work = Path(tempfile.mkdtemp(dir=OUTPUTS))
    try:
        if uploads:
            lr, gt = unpack_upload([getattr(f, "name", f) for f in uploads], work / "upload")
            source = f"{len(list_images([lr]))} uploaded images"
        else:
            lr = allowed_folder(lr_dir, "LR folder")
            gt = allowed_folder(gt_dir, "GT folder") if (gt_dir or "").strip() else None
            source = f"`{lr}`"
        return bench_folders(lr, gt, models, metrics, count, source, work, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_folders(lr: Path, gt: Path | None, models, metrics, count: int, source: str, work: Path, progress):
    files = list_images([lr])[:count]
    if not files:
        raise gr.Error(f"No images in {source}.")
    subset = work / "lr"
    subset.mkdir()
    for f in files:
        shutil.copy(f, subset / f.name)
    rows, notes, unavailable = [], [], {}
    for i, name in enumerate(models):
        progress(i / len(models), desc=f"{TITLES[name]}: upscaling {len(files)} images")
        try:
            pipe = get_pipeline(name)
        except TinySRError as e:
            notes.append(f"- {TITLES[name]} skipped: {str(e).splitlines()[0]}")
            continue
        timing = upscale_folder(pipe, subset, work / name, progress=False, max_pixels=MAX_PIXELS)
        try:
            result = evaluate_folders(work / name, gt, metrics=list(metrics), progress=False, suite=MetricSuite(list(metrics), device="cpu"))
        except (RuntimeError, ValueError) as e:  # e.g. NIQE on images under 96 px
            raise gr.Error(f"Scoring {TITLES[name]} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        rows.append({"model": TITLES[name], **{k: round(v, 4) for k, v in result["average"].items()}, "s/image": round(timing["wall_s"] / len(files), 2)})
        unavailable.update(result["unavailable"])
    table = pd.DataFrame(rows)
    metric_cols = [c for c in table.columns if c != "model"]
    summary = f"{len(files)} images from {source}" + (" with ground truth" if gt else " (no ground truth: no-reference metrics only)")
    notes += [f"- {m.upper()} unavailable: {why}" for m, why in unavailable.items()]
    return table, gr.update(choices=metric_cols, value=metric_cols[0] if metric_cols else None), summary + "\n" + "\n".join(notes)


def bench_plot(table, metric):
    if table is None or len(table) == 0 or not metric or metric not in table:
        return None
    return pd.DataFrame({"model": table["model"], metric: table[metric].astype(float)})
