"""The Upscale and Degrade-and-restore tabs, and the one-image `/upscale` endpoint."""

from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch

from tinysr.baselines import bicubic_x4
from tinysr.degradation import DegradationConfig, RealESRGANDegradation
from tinysr.device import PeakMemory
from tinysr.errors import MissingWeightsError, TinySRError
from tinysr.imageio import LoadedImage, to_pil
from tinysr.pipelines import OneStepSRPipeline

from .common import MAX_PIXELS, MODELS, TITLES, format_scores, get_pipeline, model_label, new_output, read_upload, score, sentences

OFFICIAL_SEED = 42  # the release scripts' --seed default (upstream never applies it to the posterior sample)
DEGRADE_MAX_SIDE = 512  # the clean photo is centre-cropped to this before degrading (LR 128 px)
DEFAULT_OPTIONS = {"color_fix": "model default", "tile": 64, "overlap": 8, "precision": "auto"}  # the Advanced accordion's defaults


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
            result = pipe(image, color_fix=color_fix, tile_size=int(options["tile"]), tile_overlap=int(options["overlap"]), max_pixels=MAX_PIXELS, **extra)
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
    out = new_output(name)
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


def slider_pair(shown: dict, view: str):
    """The slider's two sides for a view like 'left | right' or 'bicubic | left'. `shown` holds file paths, not
    images: gradio keeps it for every visitor, and a 1 MP input's three 16 MP results would hold 150 MB a visitor."""
    sides = []
    for name in (part.strip() for part in view.split("|")):
        path = shown.get("input" if name == "bicubic" else name)
        if path is not None and not Path(path).is_file():
            raise gr.Error("These results were deleted to keep the outputs folder under its cap: press Upscale again.")
        sides.append(bicubic_view(read_upload(path, "the input")) if name == "bicubic" and path else path)
    return tuple(sides)


@sentences
def compare(
    path, left, right, color_fix=DEFAULT_OPTIONS["color_fix"], tile=DEFAULT_OPTIONS["tile"], overlap=DEFAULT_OPTIONS["overlap"],
    precision=DEFAULT_OPTIONS["precision"], gt_path=None, view="left | right",
    recipe="default",
):
    """Upscale with two models; returns slider, reports, downloads and what other slider views need."""
    image = read_upload(path, "an image")
    gt = check_gt(gt_path, image)
    options = {"color_fix": color_fix, "tile": tile, "overlap": overlap, "precision": precision, "recipe": recipe}
    _, left_report, left_file = run_model(left, image, options, gt)
    _, right_report, right_file = run_model(right, image, options, gt)
    shown = {"left": left_file, "right": right_file, "input": path}
    return slider_pair(shown, view), left_report, right_report, left_file, right_file, shown


@sentences
def change_view(shown, view):
    return slider_pair(shown or {}, view)


@sentences
def upscale(path, model="tinysr"):
    """One image, one model: (the x4 PNG, its report). The API's simplest call."""
    if model not in MODELS:
        raise gr.Error(f"Unknown model {model!r}; choose one of {', '.join(MODELS)}.")
    image = read_upload(path, "an image")
    _, report, file = run_model(model, image, DEFAULT_OPTIONS, None)
    if file is None:
        raise gr.Error(report.replace("###", "").replace("```", "").strip())
    return file, report


# ------------------------------------------------------------------------------------ degrade-and-restore


def centre_crop(rgb: torch.Tensor, max_side: int) -> torch.Tensor:
    """Centre crop to at most max_side, both sides multiples of 4 (the degradation's scale)."""
    _, h, w = rgb.shape
    ch, cw = min(h, max_side) // 4 * 4, min(w, max_side) // 4 * 4
    if ch < 32 or cw < 32:
        raise gr.Error(f"The photo is too small ({w}x{h}); it needs at least 32x32 pixels.")
    top, left = (h - ch) // 2, (w - cw) // 2
    return rgb[:, top : top + ch, left : left + cw]


@sentences
def degrade_and_restore(path, seed, strength, left, right, precision=DEFAULT_OPTIONS["precision"]):
    clean = read_upload(path, "a clean photo")
    hr = centre_crop(clean.rgb, DEGRADE_MAX_SIDE)
    config = DegradationConfig(hflip_prob=0.0).with_strength(float(strength))
    pair = RealESRGANDegradation(config)(hr, int(seed))
    lq = LoadedImage(pair.lq, None, False, 8)
    options = {**DEFAULT_OPTIONS, "precision": precision}
    rows, images = [], {}
    for name in dict.fromkeys(["bicubic", left, right]):
        img, report, _ = run_model(name, lq, options, hr)
        images[name] = img
        if img is None:
            rows.append({"model": TITLES[name], "note": report.splitlines()[0].lstrip("# ")})
            continue
        values, unavailable = score(torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1), hr)
        rows.append({"model": TITLES[name], **{k: round(v, 4) for k, v in values.items()}, "note": "; ".join(f"{k}: {v}" for k, v in unavailable.items())})
    return to_pil(hr), to_pil(pair.lq), (images.get(left), images.get(right)), pd.DataFrame(rows)
