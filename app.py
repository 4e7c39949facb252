"""Gradio app: TinySR vs TSD-SR side by side, degrade-and-restore, benchmark, training, about.

`python app.py` serves it on http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
change that). Weights resolve like the CLI: TINYSR_MODEL / TSDSR_MODEL (folder or hub id),
else the bundled demo-scale weights in assets/weights/. Models load lazily, once; a model whose
weights are absent shows what is missing instead of failing the app. On Hugging Face Spaces,
`spaces.GPU` wraps the GPU work when the `spaces` package is present.
"""

import functools
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch

from tinysr.baselines import bicubic_x4
from tinysr.degradation import DegradationConfig, RealESRGANDegradation
from tinysr.device import PeakMemory
from tinysr.errors import MissingWeightsError, TinySRError
from tinysr.evaluate import quality_table
from tinysr.imageio import LoadedImage, load_image, to_pil
from tinysr.metrics import METRICS, MetricSuite
from tinysr.official import RECIPES
from tinysr.pipelines import NAMED_MODELS, OneStepSRPipeline, load_pipeline
from trainer.config import STAGES
from trainer.launch import PRECISIONS, RUNS, LaunchError, LaunchRequest, TrainingJob, available_configs

try:
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn):
        return fn


ROOT = Path(__file__).resolve().parent
EXAMPLES = sorted(str(p) for p in (ROOT / "assets" / "examples").glob("*.png"))
SHARED_DATA = ROOT.parent / "shared" / "data"
BENCH_RESULTS = [ROOT / "assets" / "benchmarks", RUNS]
DEMO_METRICS = ROOT / "assets" / "weights" / "demo_metrics.json"  # scripts/report_demo_weights.py writes it
MODELS = ["tinysr", "tsdsr", "realesrgan-x4plus", "bicubic"]
TITLES = {"tinysr": "TinySR", "tsdsr": "TSD-SR", "realesrgan-x4plus": "Real-ESRGAN x4plus", "bicubic": "Bicubic"}
MAX_PIXELS = int(os.environ.get("TINYSR_MAX_PIXELS", 1024 * 1024))
NR_METRICS = ["niqe", "musiq", "maniqa", "clipiqa"]
FR_METRICS = ["psnr", "ssim", "lpips", "dists"]
OFFICIAL_SEED = 42  # the release scripts' --seed default (upstream never applies it to the posterior sample)
DEGRADE_MAX_SIDE = 512  # the clean photo is centre-cropped to this before degrading (LR 128 px)
JOB = TrainingJob()
OUTPUTS = Path(tempfile.mkdtemp(prefix="tinysr-app-"))


class ImageUpload(gr.Image):
    """gr.Image whose upload reaches the app as the unopened file, so an unreadable one gets our message
    (gr.Image itself opens uploads with Pillow and converts them to RGB: no 16-bit, CMYK or errors of ours)."""

    is_template = True  # rendered by gr.Image's frontend

    def preprocess(self, payload):
        if payload is None or payload.path is None:
            return super().preprocess(payload)
        return payload.path


def model_label(name: str) -> str:
    """Dropdown label that says which weights a name resolves to, demo scale included."""
    if name not in NAMED_MODELS:
        return TITLES[name]
    env, bundled = NAMED_MODELS[name]
    if os.environ.get(env):
        return f"{TITLES[name]} ({os.environ[env]})"
    if (bundled / "model_index.json").is_file():
        return f"{TITLES[name]} (demo scale, bundled)"
    return f"{TITLES[name]} (weights missing)"


@functools.lru_cache(maxsize=8)
def get_pipeline(name: str, dtype: str = "fp32"):
    return load_pipeline(name, dtype=dtype)


@functools.lru_cache(maxsize=2)
def metric_suite(names: tuple[str, ...]) -> MetricSuite:
    return MetricSuite(list(names), device="cpu")


_metric_lock = threading.Lock()


def score(image: torch.Tensor, gt: torch.Tensor | None) -> tuple[dict, dict]:
    """Scores that can run, and {metric: why not} for those that cannot (missing weights)."""
    names = tuple(NR_METRICS + (FR_METRICS if gt is not None else []))
    suite = metric_suite(names)
    values, failed = {}, {}
    with _metric_lock:  # pyiqa metric modules are not re-entrant
        for name in names:
            try:
                values.update(suite.score(image[None], None if gt is None else gt[None], names=[name]))
            except (RuntimeError, ValueError, AssertionError) as e:  # e.g. NIQE needs images of 96 px and more
                failed[name] = f"failed on this image ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return values, {**{n: suite.unavailable[n] for n in names if n in suite.unavailable}, **failed}


def format_scores(values: dict, unavailable: dict) -> str:
    lines = []
    for name, value in values.items():
        arrow = "lower is better" if METRICS[name].lower_better else "higher is better"
        lines.append(f"| {name.upper()} | {value:.4f} | {arrow} |")
    table = "| metric | value | |\n|---|---|---|\n" + "\n".join(lines) if lines else ""
    missing = "".join(f"\n- {n.upper()} unavailable: {why}" for n, why in unavailable.items())
    return table + ("\n" + missing if missing else "")


def read_upload(path: str | None, what: str) -> LoadedImage:
    if path is None:
        raise gr.Error(f"Upload {what} first.")
    try:
        return load_image(path, max_pixels=MAX_PIXELS)
    except TinySRError as e:
        raise gr.Error(f"{what}: {e}") from None


def run_model(name: str, image: LoadedImage, options: dict, gt: torch.Tensor | None) -> tuple:
    """(PIL output or None, markdown report, file for download or None). Never raises for missing weights."""
    try:
        pipe = get_pipeline(name, options["precision"])
    except MissingWeightsError as e:
        return None, f"### {TITLES[name]}: weights missing\n```\n{e}\n```", None
    except TinySRError as e:
        return None, f"### {TITLES[name]}: cannot load\n{e}", None
    color_fix = None if options["color_fix"] == "model default" else options["color_fix"]
    recipe = options.get("recipe", "default")
    # the official recipe is the release scripts' (diffusion models only); TSD-SR's posterior sample seeded
    extra = {"recipe": recipe, "seed": OFFICIAL_SEED} if isinstance(pipe, OneStepSRPipeline) and recipe != "default" else {}
    try:
        with PeakMemory(pipe.device) as memory:
            result = pipe(image, color_fix=color_fix, tile_size=int(options["tile"]), tile_overlap=int(options["overlap"]), **extra)
    except (TinySRError, ValueError) as e:
        raise gr.Error(f"{TITLES[name]}: {e}") from None
    params = sum(pipe.num_parameters().values())
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
    values, unavailable = score(result.image, gt)
    report = (
        f"### {model_label(name)}\n"
        + (f"**Recipe**: official (the release scripts', seed {OFFICIAL_SEED})  \n" if extra else "")
        + f"**Latency** ({result.dtype}, {pipe.device}): {timings}  \n"
        f"**Peak memory** ({memory.kind}): {memory.peak_bytes / 2**20:.0f} MiB  \n"
        f"**Parameters**: {params / 1e6:.2f} M\n\n" + format_scores(values, unavailable)
    )
    out = OUTPUTS / f"{name}-{os.urandom(4).hex()}.png"
    pil = result.pil
    pil.save(out)
    return pil, report, str(out)


def bicubic_view(image: LoadedImage):
    return to_pil(bicubic_x4(image.rgb[None], image.bit_depth)[0], None, image.grayscale)


def check_gt(gt_path: str | None, image: LoadedImage) -> torch.Tensor | None:
    if gt_path is None:
        return None
    gt = read_upload(gt_path, "the ground truth")
    want = (image.rgb.shape[1] * 4, image.rgb.shape[2] * 4)
    if tuple(gt.rgb.shape[1:]) != want:
        raise gr.Error(f"The ground truth must be {want[1]}x{want[0]} (4x the input); it is {gt.rgb.shape[2]}x{gt.rgb.shape[1]}.")
    return gt.rgb


def slider_pair(images: dict, view: str):
    """The slider's two sides for a view like 'left | right' or 'bicubic | left'."""
    a, b = (part.strip() for part in view.split("|"))
    return images.get(a), images.get(b)


@gpu
def compare(
    path, left, right, color_fix="model default", tile=64, overlap=8, precision="fp32", gt_path=None, view="left | right",
    recipe="default",
):
    """Upscale with two models; returns slider, reports, downloads and the images for other slider views."""
    image = read_upload(path, "an image")
    gt = check_gt(gt_path, image)
    options = {"color_fix": color_fix, "tile": tile, "overlap": overlap, "precision": precision, "recipe": recipe}
    left_img, left_report, left_file = run_model(left, image, options, gt)
    right_img, right_report, right_file = run_model(right, image, options, gt)
    images = {"left": left_img, "right": right_img, "bicubic": bicubic_view(image)}
    return slider_pair(images, view), left_report, right_report, left_file, right_file, images


def change_view(images, view):
    return slider_pair(images or {}, view)


# ------------------------------------------------------------------------------------ degrade-and-restore


def centre_crop(rgb: torch.Tensor, max_side: int) -> torch.Tensor:
    """Centre crop to at most max_side, both sides multiples of 4 (the degradation's scale)."""
    _, h, w = rgb.shape
    ch, cw = min(h, max_side) // 4 * 4, min(w, max_side) // 4 * 4
    if ch < 32 or cw < 32:
        raise gr.Error(f"The photo is too small ({w}x{h}); it needs at least 32x32 pixels.")
    top, left = (h - ch) // 2, (w - cw) // 2
    return rgb[:, top : top + ch, left : left + cw]


@gpu
def degrade_and_restore(path, seed, strength, left, right, precision="fp32"):
    clean = read_upload(path, "a clean photo")
    hr = centre_crop(clean.rgb, DEGRADE_MAX_SIDE)
    config = DegradationConfig(hflip_prob=0.0).with_strength(float(strength))
    pair = RealESRGANDegradation(config)(hr, int(seed))
    lq = LoadedImage(pair.lq, None, False, 8)
    options = {"color_fix": "model default", "tile": 64, "overlap": 8, "precision": precision}
    rows, images = [], {}
    for name in dict.fromkeys(["bicubic", left, right]):
        img, report, _ = run_model(name, lq, options, hr)
        images[name] = img
        if img is None:
            rows.append({"model": TITLES[name], "note": report.splitlines()[0].lstrip("# ")})
            continue
        values, unavailable = score(torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1), hr)
        rows.append({"model": TITLES[name], **{k: round(v, 4) for k, v in values.items()}, "note": "; ".join(f"{k}: {v}" for k, v in unavailable.items())})
    table = pd.DataFrame(rows)
    return to_pil(hr), to_pil(pair.lq), (images.get(left), images.get(right)), table


# ------------------------------------------------------------------------------------------- benchmark


def default_bench_folders() -> tuple[str, str]:
    realsr = SHARED_DATA / "RealSRVal_crop128"
    if (realsr / "test_LR").is_dir():
        return str(realsr / "test_LR"), str(realsr / "test_HR")
    return "", ""


def run_bench(lr_dir, gt_dir, models, metrics, max_images, progress=gr.Progress()):
    from tinysr.evaluate import evaluate_folders, upscale_folder
    from tinysr.imageio import list_images

    lr, gt = Path(lr_dir or ""), Path(gt_dir) if gt_dir else None
    if not lr.is_dir():
        raise gr.Error(f"LR folder {lr_dir!r} is not a folder on the server.")
    if gt is not None and not gt.is_dir():
        raise gr.Error(f"GT folder {gt_dir!r} is not a folder on the server.")
    if not models or not metrics:
        raise gr.Error("Choose at least one model and one metric.")
    files = list_images([lr])[: int(max_images)]
    if not files:
        raise gr.Error(f"No images in {lr}.")
    work = Path(tempfile.mkdtemp(dir=OUTPUTS))
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
        timing = upscale_folder(pipe, subset, work / name, progress=False)
        try:
            result = evaluate_folders(work / name, gt, metrics=list(metrics), progress=False, suite=MetricSuite(list(metrics), device="cpu"))
        except (RuntimeError, ValueError, TinySRError) as e:  # e.g. NIQE on images under 96 px
            raise gr.Error(f"Scoring {TITLES[name]} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        rows.append({"model": TITLES[name], **{k: round(v, 4) for k, v in result["average"].items()}, "s/image": round(timing["wall_s"] / len(files), 2)})
        unavailable.update(result["unavailable"])
    table = pd.DataFrame(rows)
    metric_cols = [c for c in table.columns if c not in ("model",)]
    summary = f"{len(files)} images from `{lr}`" + (f" against `{gt}`" if gt else " (no ground truth: no-reference metrics only)")
    return table, gr.update(choices=metric_cols, value=metric_cols[0] if metric_cols else None), summary + "\n" + "\n".join(notes + [f"- {m.upper()} unavailable: {why}" for m, why in unavailable.items()])


def bench_plot(table, metric):
    if table is None or len(table) == 0 or not metric or metric not in table:
        return None
    return pd.DataFrame({"model": table["model"], metric: table[metric].astype(float)})


# -------------------------------------------------------------------------------------------- training


def launch_training(stage, config, name, steps, batch_size, lr, gpus, precision):
    try:
        request = LaunchRequest(stage, config, (name or "").strip(), int(steps or 0), int(batch_size or 0), float(lr or 0), int(gpus or 1), precision)
        command = JOB.start(request)
    except (LaunchError, ValueError) as e:
        raise gr.Error(str(e)) from None
    return f"Started: `{' '.join(command[2:])}`"


def stop_training():
    return "Stopped." if JOB.stop() else "No training job is running."


def training_status():
    status = JOB.status()
    rows = status["rows"]
    if status["state"] == "idle":
        return "No job started yet.", "", None, ""
    last = rows[-1]["step"] if rows else 0
    target = status.get("target_steps")
    pct = 100 * last / target if target else 0
    bar = f"<progress max='100' value='{pct:.0f}' style='width:100%'></progress>" if target else ""
    text = f"**{status['state']}**: {JOB.request.name} / {status['stage']}, step {last}" + (f" of {target}" if target else "") + f", {status['elapsed_s']:.0f} s"
    plot = pd.DataFrame({"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows]}) if rows else None
    return text, bar, plot, JOB.console_tail()


def default_config() -> str | None:
    configs = available_configs()
    return "demo.yaml" if "demo.yaml" in configs else (configs[0] if configs else None)


# ----------------------------------------------------------------------------------------------- about


def demo_quality_markdown() -> str:
    """What the bundled demo-scale weights scored, as their model cards report it."""
    if not DEMO_METRICS.is_file():
        return f"No measurements of the bundled weights ({DEMO_METRICS} is missing: `python scripts/report_demo_weights.py`)."
    labels = {name: TITLES[name] + (" (demo scale, bundled)" if name in ("tinysr", "tsdsr") else "") for name in TITLES}
    return (
        "### Quality of the bundled demo-scale weights (`python scripts/report_demo_weights.py`)\n"
        + quality_table(json.loads(DEMO_METRICS.read_text())["metrics"], labels)
    )


def about_markdown() -> str:
    from tinysr.bench import format_table

    parts = [demo_quality_markdown(), "## Efficiency"]
    results = [p for folder in BENCH_RESULTS if folder.is_dir() for p in sorted(folder.glob("bench*.json"))]
    for path in results:
        try:
            parts.append(f"`{path.relative_to(ROOT)}`\n```\n{format_table(json.loads(path.read_text()))}\n```")
        except (KeyError, ValueError) as e:
            parts.append(f"`{path}` is not a benchmark result ({type(e).__name__})")
    if not results:
        parts.append("No benchmark results yet: `python -m tinysr bench --json runs/bench.json`.")
    parts.append("## Learned pruning decision")
    decision = pruning_decision()
    parts.append(decision or "No pruning decision found (a TinySR folder's `pruning.json`, written by `python -m trainer prune-export`).")
    return "\n\n".join(parts)


def pruning_decision() -> str | None:
    env, bundled = NAMED_MODELS["tinysr"]
    folder = Path(os.environ.get(env) or bundled)
    path = folder / "pruning.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    kept = set(d["kept_blocks"])
    size = d.get("group_size", 4)
    n = d.get("num_blocks", size * (max(kept) // size + 1))
    rows = []
    for g in range(n // size):
        cells = " ".join("■" if b in kept else "□" for b in range(g * size, (g + 1) * size))
        rows.append(f"| group {g} | {cells} | {', '.join(str(b) for b in range(g * size, (g + 1) * size) if b in kept)} |")
    return (
        f"From `{path}`: {len(kept)} of {n} teacher blocks kept (■ kept, □ pruned).\n\n| group | blocks | kept |\n|---|---|---|\n"
        + "\n".join(rows)
    )


# ------------------------------------------------------------------------------------------------- UI


def build_demo() -> gr.Blocks:
    choices = [(model_label(m), m) for m in MODELS]
    with gr.Blocks(title="TinySR") as demo:
        gr.Markdown(
            "# TinySR vs TSD-SR: one-step 4x real-world super-resolution\n"
            "Weights marked *demo scale* were trained on this project's CPU demo run, not the paper's weights."
        )
        with gr.Tab("Upscale"):
            with gr.Row():
                with gr.Column():
                    image = ImageUpload(type="filepath", label="Low-resolution input", sources=["upload", "clipboard"], elem_id="lr-input")
                    gr.Examples(EXAMPLES, inputs=image)
                with gr.Column():
                    left = gr.Dropdown(choices, value="tinysr", label="Left model")
                    right = gr.Dropdown(choices, value="tsdsr", label="Right model")
                    view = gr.Radio(["left | right", "bicubic | left", "bicubic | right"], value="left | right", label="Slider compares")
                    with gr.Accordion("Advanced", open=False):
                        color_fix = gr.Dropdown(["model default", "adain", "wavelet", "none"], value="model default", label="Colour fix")
                        tile = gr.Slider(16, 128, value=64, step=8, label="Latent tile size (8 px each)")
                        overlap = gr.Slider(0, 32, value=8, step=2, label="Latent tile overlap")
                        precision = gr.Dropdown(["fp32", "fp16", "bf16"], value="fp32", label="Precision")
                        recipe = gr.Radio(
                            list(RECIPES), value="default", label="Recipe",
                            info="official: the release scripts' pre/post-processing, byte for byte for the same model outputs (README: Fidelity)",
                        )
                    gt = ImageUpload(type="filepath", label="Ground truth (optional, 4x the input): adds PSNR/SSIM/LPIPS/DISTS")
                    run = gr.Button("Upscale x4", variant="primary")
            slider = gr.ImageSlider(label="Comparison", type="pil", format="png", elem_id="comparison")
            with gr.Row():
                with gr.Column():
                    report_left = gr.Markdown(elem_id="report-left")
                    file_left = gr.File(label="Download left")
                with gr.Column():
                    report_right = gr.Markdown(elem_id="report-right")
                    file_right = gr.File(label="Download right")
            images = gr.State({})
            run.click(
                compare,
                [image, left, right, color_fix, tile, overlap, precision, gt, view, recipe],
                [slider, report_left, report_right, file_left, file_right, images],
                api_name="compare",
            )
            view.change(change_view, [images, view], slider, api_name=False)

        with gr.Tab("Degrade and restore"):
            gr.Markdown(
                "Upload a clean photo: it is centre-cropped to at most 512 px, degraded with the project's "
                "Real-ESRGAN second-order pipeline (the one training uses), and restored by both models; "
                "full-reference metrics are against the clean crop."
            )
            with gr.Row():
                clean = ImageUpload(type="filepath", label="Clean photo", sources=["upload", "clipboard"], elem_id="clean-input")
                with gr.Column():
                    seed = gr.Number(80, precision=0, label="Seed")
                    strength = gr.Slider(0.25, 2.0, value=1.0, step=0.05, label="Strength (1 = Real-ESRGAN's ranges)")
                    d_left = gr.Dropdown(choices, value="tinysr", label="Model A")
                    d_right = gr.Dropdown(choices, value="tsdsr", label="Model B")
                    d_run = gr.Button("Degrade and restore", variant="primary")
            with gr.Row():
                d_gt = gr.Image(label="Clean crop", type="pil")
                d_lq = gr.Image(label="Synthesised low-resolution input", type="pil")
            d_slider = gr.ImageSlider(label="A | B", type="pil", format="png")
            d_table = gr.Dataframe(label="Metrics against the clean crop", elem_id="degrade-table")
            d_run.click(degrade_and_restore, [clean, seed, strength, d_left, d_right], [d_gt, d_lq, d_slider, d_table], api_name="degrade_restore")

        with gr.Tab("Benchmark"):
            lr_default, gt_default = default_bench_folders()
            with gr.Row():
                lr_dir = gr.Textbox(lr_default, label="LR folder (on the server)")
                gt_dir = gr.Textbox(gt_default, label="GT folder (optional)")
            with gr.Row():
                b_models = gr.CheckboxGroup(choices, value=["bicubic", "tinysr"], label="Models")
                b_metrics = gr.CheckboxGroup(["psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa"], value=["psnr", "ssim", "niqe"], label="Metrics")
                max_images = gr.Number(10, precision=0, minimum=1, label="Images (first N)")
            b_run = gr.Button("Run benchmark", variant="primary")
            with gr.Accordion("Measured for the bundled demo-scale weights", open=False):
                gr.Markdown(demo_quality_markdown(), elem_id="bench-bundled")
            b_summary = gr.Markdown(elem_id="bench-summary")
            b_table = gr.Dataframe(label="Averages", elem_id="bench-table")
            b_metric = gr.Dropdown([], label="Bar chart of")
            b_plot = gr.BarPlot(x="model", y=None, label="Per model")
            b_run.click(run_bench, [lr_dir, gt_dir, b_models, b_metrics, max_images], [b_table, b_metric, b_summary], api_name="benchmark")
            b_metric.change(lambda t, m: gr.update(value=bench_plot(t, m), y=m), [b_table, b_metric], b_plot, api_name=False)

        with gr.Tab("Training"):
            gr.Markdown(f"Launches `accelerate launch -m trainer STAGE --config ...` (one job at a time; outputs in `{RUNS}/NAME/`).")
            with gr.Row():
                t_config = gr.Dropdown(available_configs(), value=default_config(), label="Config")
                t_stage = gr.Dropdown([*STAGES, "all"], value="vae-encoder", label="Stage")
                t_name = gr.Textbox("app-demo", label="Run name")
            with gr.Row():
                t_steps = gr.Number(0, precision=0, minimum=0, label="Steps (0: config)")
                t_batch = gr.Number(0, precision=0, minimum=0, label="Batch size (0: config)")
                t_lr = gr.Number(0, minimum=0, label="Learning rate (0: config)")
                t_gpus = gr.Number(1, precision=0, minimum=1, label="GPUs / processes")
                t_precision = gr.Dropdown(list(PRECISIONS), value="no", label="Mixed precision")
            with gr.Row():
                t_start = gr.Button("Start", variant="primary")
                t_stop = gr.Button("Stop", variant="stop")
            t_message = gr.Markdown(elem_id="train-message")
            t_status = gr.Markdown(elem_id="train-status")
            t_bar = gr.HTML()
            t_plot = gr.LinePlot(x="step", y="loss", label="Loss")
            t_log = gr.Textbox(label="Console", lines=12, max_lines=12, autoscroll=True)
            t_start.click(launch_training, [t_stage, t_config, t_name, t_steps, t_batch, t_lr, t_gpus, t_precision], t_message, api_name="train_start")
            t_stop.click(stop_training, None, t_message, api_name="train_stop")
            timer = gr.Timer(1.0)
            timer.tick(training_status, None, [t_status, t_bar, t_plot, t_log], api_name="train_status", queue=False)

        with gr.Tab("About"):
            gr.Markdown(about_markdown(), elem_id="about")
    return demo


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    build_demo().queue(default_concurrency_limit=1, max_size=32).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), allowed_paths=[str(OUTPUTS)]
    )
