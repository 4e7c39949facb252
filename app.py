"""Gradio app: TinySR vs TSD-SR side by side, degrade-and-restore, benchmark, training, about.

`python app.py` serves it on http://127.0.0.1:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
change that). Weights resolve like the CLI: TINYSR_MODEL / TSDSR_MODEL (folder or hub id),
else the bundled demo-scale weights in assets/weights/. The default models and metrics load in
the background at start-up; a model whose weights are absent shows what is missing instead of
failing the app. Hosted use (a public Space): see the README's Spaces section; the tabs live in
webapp/. On Hugging Face Spaces, `spaces.GPU` wraps the GPU work when the `spaces` package is present.
"""

import atexit
import os
import signal
import sys

import gradio as gr
import torch

from tinysr.attention import kernel_setting
from tinysr.device import PRECISIONS as INFERENCE_PRECISIONS
from tinysr.device import reuse_freed_memory
from tinysr.errors import UnsupportedOption
from tinysr.official import RECIPES
from trainer.config import STAGES
from trainer.launch import PRECISIONS, RUNS, available_configs
from webapp import about, benchmark, training, upscale
from webapp.common import EXAMPLES, MODELS, NR_METRICS, OUTPUTS, ImageUpload, keep_page_files, model_label, warm_up, warming
from webapp.paths import data_roots

try:
    import spaces

    gpu = spaces.GPU
except ImportError:

    def gpu(fn):
        return fn


UPLOAD_LIMIT = os.environ.get("TINYSR_MAX_UPLOAD", "50mb")  # gradio refuses larger uploads before they reach us
# gradio keeps each visitor's copy of the page (1-4 MB measured) until this many are held; the oldest go first
SESSIONS = int(os.environ.get("TINYSR_SESSIONS", 200))
WARM_MODELS = ["tinysr", "tsdsr"]


def loading_status():
    """The banner under the title while the default models load, and the timer that polls it."""
    ready = not warming()
    text = "" if ready else "⏳ Loading the default models and metrics in the background: the first result may take a little longer."
    return text, gr.Timer(active=not ready)


def upscale_tab(choices):
    with gr.Row():
        with gr.Column():
            image = ImageUpload(type="filepath", label="Low-resolution input", sources=["upload", "clipboard"], elem_id="lr-input")
            gr.Examples(EXAMPLES, inputs=image, elem_id="examples")
        with gr.Column():
            left = gr.Dropdown(choices, value="tinysr", label="Left model")
            right = gr.Dropdown(choices, value="tsdsr", label="Right model")
            view = gr.Radio(["left | right", "bicubic | left", "bicubic | right"], value="left | right", label="Slider compares")
            with gr.Accordion("Advanced", open=False):
                color_fix = gr.Dropdown(["model default", "adain", "wavelet", "none"], value="model default", label="Colour fix")
                tile = gr.Slider(16, 128, value=64, step=8, label="Latent tile size (8 px each)")
                overlap = gr.Slider(0, 32, value=8, step=2, label="Latent tile overlap")
                precision = gr.Dropdown(
                    list(INFERENCE_PRECISIONS), value="auto", label="Precision",
                    info="auto: fp16 on a GPU, bf16 on CPUs with native bf16, else fp32; int8: the transformer's linears in int8 (CPU only)",
                )
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
    shown = gr.State({})
    run.click(
        gpu(upscale.compare),
        [image, left, right, color_fix, tile, overlap, precision, gt, view, recipe],
        [slider, report_left, report_right, file_left, file_right, shown],
        api_name="compare",
    )
    view.change(upscale.change_view, [shown, view], slider, api_name=False)
    # /upscale: one image, one model, for gradio_client users (not shown in the page)
    with gr.Group(visible=False):
        api_image = ImageUpload(type="filepath")
        api_model = gr.Textbox("tinysr")  # a text, so a wrong name gets our sentence listing the models
        api_out = gr.Image(type="filepath", format="png")
        api_report = gr.Markdown()
        api_run = gr.Button()
    api_run.click(gpu(upscale.upscale), [api_image, api_model], [api_out, api_report], api_name="upscale")


def degrade_tab(choices):
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
    d_run.click(gpu(upscale.degrade_and_restore), [clean, seed, strength, d_left, d_right], [d_gt, d_lq, d_slider, d_table], api_name="degrade_restore")


def benchmark_tab(choices):
    lr_default, gt_default = benchmark.default_bench_folders()
    roots = ", ".join(f"`{r}`" for r in data_roots())
    gr.Markdown(f"Folders on the server must lie under {roots}; or upload LR images, or a zip with `lr/` and optional `gt/` folders.")
    with gr.Row():
        lr_dir = gr.Textbox(lr_default, label="LR folder (on the server)")
        gt_dir = gr.Textbox(gt_default, label="GT folder (optional)")
        uploads = gr.File(file_count="multiple", file_types=["image", ".zip"], label="...or upload images / a zip", elem_id="bench-upload")
    with gr.Row():
        b_models = gr.CheckboxGroup(choices, value=["bicubic", "tinysr"], label="Models")
        b_metrics = gr.CheckboxGroup(["psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa"], value=["psnr", "ssim", "niqe"], label="Metrics")
        max_images = gr.Number(10, precision=0, minimum=1, maximum=benchmark.MAX_IMAGES, label="Images (first N)")
    b_run = gr.Button("Run benchmark", variant="primary")
    with gr.Accordion("Measured for the bundled demo-scale weights", open=False):
        gr.Markdown(about.demo_quality_markdown(), elem_id="bench-bundled")
    b_summary = gr.Markdown(elem_id="bench-summary")
    b_table = gr.Dataframe(label="Averages", elem_id="bench-table")
    b_metric = gr.Dropdown([], label="Bar chart of")
    b_plot = gr.BarPlot(x="model", y=None, label="Per model")
    b_run.click(gpu(benchmark.run_bench), [lr_dir, gt_dir, b_models, b_metrics, max_images, uploads], [b_table, b_metric, b_summary], api_name="benchmark")
    b_metric.change(lambda t, m: gr.update(value=benchmark.bench_plot(t, m), y=m), [b_table, b_metric], b_plot, api_name=False)


def training_tab(demo):
    enabled = training.TRAINING_ENABLED
    if not enabled:
        gr.Markdown(training.DISABLED_NOTE, elem_id="train-disabled")
    gr.Markdown(f"Launches `accelerate launch -m trainer STAGE --config ...` (one job at a time; outputs in `{RUNS}/NAME/`).")
    with gr.Row():
        t_config = gr.Dropdown(available_configs(), value=training.default_config(), label="Config", interactive=enabled)
        t_name = gr.Textbox("app-demo", label="Run name", interactive=enabled)
    with gr.Accordion("1. Prepare data: photos -> degraded training pairs", open=True):
        with gr.Row():
            p_source = gr.Radio(list(training.SOURCES), value=training.SOURCES[0], label="Photos", interactive=enabled)
            p_uploads = gr.File(file_count="multiple", file_types=["image", ".zip"], label="Photos to upload", interactive=enabled)
            p_folder = gr.Textbox("", label="Server folder (under the allowed roots)", interactive=enabled)
            p_per_image = gr.Number(8, precision=0, minimum=1, maximum=64, label="Random crops per photo", interactive=enabled)
        p_run = gr.Button("Prepare data", interactive=enabled)
        p_message = gr.Markdown(elem_id="prepare-message")
    gr.Markdown("2. Train")
    with gr.Row():
        t_stage = gr.Dropdown([*STAGES, "all"], value="vae-encoder", label="Stage", interactive=enabled)
        t_steps = gr.Number(0, precision=0, minimum=0, label="Steps (0: config)", interactive=enabled)
        t_batch = gr.Number(0, precision=0, minimum=0, label="Batch size (0: config)", interactive=enabled)
        t_lr = gr.Number(0, minimum=0, label="Learning rate (0: config)", interactive=enabled)
        t_gpus = gr.Number(1, precision=0, minimum=1, label="GPUs / processes", interactive=enabled)
        t_precision = gr.Dropdown(list(PRECISIONS), value="no", label="Mixed precision", interactive=enabled)
    t_pairs = gr.Markdown(elem_id="train-pairs")
    with gr.Row():
        t_start = gr.Button("Start", variant="primary", interactive=False)
        t_stop = gr.Button("Stop", variant="stop", interactive=enabled)
    t_message = gr.Markdown(elem_id="train-message")
    t_status = gr.Markdown(elem_id="train-status")
    t_bar = gr.HTML()
    t_plot = gr.LinePlot(x="step", y="loss", label="Loss")
    t_log = gr.Textbox(label="Console", lines=12, max_lines=12, autoscroll=True)
    prepared = p_run.click(training.prepare_data, [t_name, t_config, p_source, p_uploads, p_folder, p_per_image], p_message, api_name="prepare_data")
    for trigger in (demo.load, t_name.change, t_config.change, prepared.then):
        trigger(training.pairs_status, [t_name, t_config], [t_pairs, t_start], api_name=False, queue=False)
    t_start.click(training.launch_training, [t_stage, t_config, t_name, t_steps, t_batch, t_lr, t_gpus, t_precision], t_message, api_name="train_start")
    t_stop.click(training.stop_training, None, t_message, api_name="train_stop")
    timer = gr.Timer(1.0)
    timer.tick(training.training_status, None, [t_status, t_bar, t_plot, t_log], api_name="train_status", queue=False)


def build_demo() -> gr.Blocks:
    choices = [(model_label(m), m) for m in MODELS]
    # gradio's own cache (uploads, served results) is swept every 10 minutes of files older than an hour
    with gr.Blocks(title="TinySR", delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "# TinySR vs TSD-SR: one-step 4x real-world super-resolution\n"
            "Weights marked *demo scale* were trained on this project's CPU demo run, not the paper's weights."
        )
        loading = gr.Markdown(elem_id="loading")
        poll = gr.Timer(2.0)
        poll.tick(loading_status, None, [loading, poll], api_name=False, queue=False)
        demo.load(loading_status, None, [loading, poll], api_name=False, queue=False)
        with gr.Tab("Upscale"):
            upscale_tab(choices)
        with gr.Tab("Degrade and restore"):
            degrade_tab(choices)
        with gr.Tab("Benchmark"):
            benchmark_tab(choices)
        with gr.Tab("Training"):
            training_tab(demo)
        with gr.Tab("About"):
            gr.Markdown(about.about_markdown(), elem_id="about")
    return demo


def auth_pairs() -> list[tuple[str, str]] | None:
    """TINYSR_AUTH="user:password[,user2:password2]": gradio's login in front of the whole app."""
    spec = os.environ.get("TINYSR_AUTH", "").strip()
    if not spec:
        return None
    pairs = [tuple(item.split(":", 1)) for item in spec.split(",") if item.strip()]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise SystemExit("TINYSR_AUTH must look like user:password[,user2:password2]")
    return pairs


def attention_setting() -> str:
    """TINYSR_CPU_ATTENTION (tinysr.attention), checked before the warm-up rather than failing every request."""
    try:
        return kernel_setting()
    except UnsupportedOption as e:
        raise SystemExit(str(e)) from None


def serve(demo: gr.Blocks, **launch_options) -> None:
    keep_page_files(demo.get_config_file())
    demo.queue(default_concurrency_limit=1, max_size=32).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), allowed_paths=[str(OUTPUTS)], auth=auth_pairs(),
        max_file_size=UPLOAD_LIMIT, state_session_capacity=SESSIONS, **launch_options,
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    attention_setting()
    reuse_freed_memory()
    # a training job runs in a session of its own: stop it when the app goes, on Ctrl-C or SIGTERM alike
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    atexit.register(training.JOB.stop)
    # gradio's cache (uploads, the results it serves) inside our outputs folder, so one cap bounds both
    os.environ.setdefault("GRADIO_TEMP_DIR", str(OUTPUTS / "gradio"))
    warm_up(WARM_MODELS, tuple(NR_METRICS))
    serve(build_demo())
