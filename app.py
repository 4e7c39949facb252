"""Gradio app: upscale a photo x4 with TinySR and TSD-SR side by side.

This first version covers the Upscale tab; degrade-and-restore, benchmark and training tabs
arrive with the app issue. Models load lazily, once; missing weights show what to provide.
"""

import functools
import os

import gradio as gr
import torch
import torch.nn.functional as F

from tinysr.errors import TinySRError
from tinysr.imageio import load_image, to_pil
from tinysr.pipelines import load_pipeline

MODELS = ["tinysr", "tsdsr", "bicubic"]
MAX_PIXELS = int(os.environ.get("TINYSR_MAX_PIXELS", 1024 * 1024))


@functools.lru_cache(maxsize=4)
def get_pipeline(name: str):
    return load_pipeline(name, dtype=os.environ.get("TINYSR_DTYPE", "fp32"))


def upscale(path: str | None, name: str, color_fix: str):
    if path is None:
        raise gr.Error("Upload an image first.")
    try:
        loaded = load_image(path, max_pixels=MAX_PIXELS)
        if name == "bicubic":
            h, w = loaded.rgb.shape[1:]
            rgb = F.interpolate(loaded.rgb[None], size=(4 * h, 4 * w), mode="bicubic", align_corners=False)[0]
            return to_pil(rgb, None, loaded.grayscale), "bicubic x4"
        result = get_pipeline(name)(loaded, color_fix=None if color_fix == "model default" else color_fix)
    except TinySRError as e:
        raise gr.Error(str(e)) from None
    t = result.timings
    info = f"{name} [{result.dtype}]: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items())
    return result.pil, info


def compare(path, left, right, color_fix):
    a, info_a = upscale(path, left, color_fix)
    b, info_b = upscale(path, right, color_fix)
    return (a, b), info_a, info_b


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="TinySR") as demo:
        gr.Markdown("# TinySR vs TSD-SR: one-step 4x real-world super-resolution")
        with gr.Row():
            image = gr.Image(type="filepath", label="Low-resolution input", sources=["upload", "clipboard"])
            with gr.Column():
                left = gr.Dropdown(MODELS, value="tinysr", label="Left model")
                right = gr.Dropdown(MODELS, value="tsdsr", label="Right model")
                color_fix = gr.Dropdown(["model default", "adain", "wavelet", "none"], value="model default", label="Colour fix")
                run = gr.Button("Upscale x4", variant="primary")
        slider = gr.ImageSlider(label="Left | Right", type="pil")
        info_left, info_right = gr.Textbox(label="Left"), gr.Textbox(label="Right")
        run.click(compare, [image, left, right, color_fix], [slider, info_left, info_right], api_name="compare")
    return demo


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    build_demo().queue(default_concurrency_limit=1).launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
