"""Pipelines, and `load_pipeline`, which turns a model name, folder or hub id into one."""

import os

from ..errors import MissingWeightsError, WrongModelError
from ..release import is_tinysr_release
from ..weights import ASSETS, SD3_MEDIUM, read_json, resolve_folder
from .base import OneStepSRPipeline, SRResult
from .tinysr import TinySRPipeline
from .tsdsr import TSDSRPipeline

PIPELINES = {cls.model_index_name: cls for cls in (TinySRPipeline, TSDSRPipeline)}
BUNDLED = ASSETS / "weights"

# name -> (environment variable for a folder or hub id in our format, bundled demo folder)
NAMED_MODELS = {
    "tinysr": ("TINYSR_MODEL", BUNDLED / "tinysr-demo"),
    "tsdsr": ("TSDSR_MODEL", BUNDLED / "tsdsr-demo"),
}


def load_pipeline(model: str, *, revision=None, token=None, device=None, dtype="fp32", backend="torch") -> OneStepSRPipeline:
    """`tinysr`, `tsdsr`, a baseline (`bicubic`, `realesrgan-x4plus`), or a folder / hub id in our format.

    A folder written by `python -m tinysr export-onnx` runs with onnxruntime; `backend="onnx"` insists on one.

    A folder's model_index.json picks the pipeline class; an official TinySR checkpoint folder
    (tinybackbone/, tinysr/, vae/) loads as released, its pool_embeds.pt found inside or in TINYSR_EMBEDS_DIR.

    `tsdsr` also loads the official layout when TSDSR_LORA_DIR is set (with TSDSR_EMBEDS_DIR and,
    optionally, TSDSR_SD3 for the base model).
    """
    kwargs = {"device": device, "dtype": dtype}
    from ..onnx import OnnxPipeline, is_onnx_folder

    if backend not in ("torch", "onnx"):
        raise ValueError(f"unknown backend {backend!r}; choose torch or onnx")
    if is_onnx_folder(model):
        return OnnxPipeline(model, **kwargs)
    if backend == "onnx":
        raise MissingWeightsError(
            "onnx_pipeline.json", [str(model)], f"The ONNX backend runs an exported folder: `python -m tinysr export-onnx {model} -o DIR`, then --model DIR."
        )
    from ..baselines import BASELINES

    if model in BASELINES:
        return BASELINES[model](**kwargs)
    if model in NAMED_MODELS:
        env, bundled = NAMED_MODELS[model]
        if os.environ.get(env):
            return load_pipeline(os.environ[env], revision=revision, token=token, **kwargs)
        if model == "tsdsr" and os.environ.get("TSDSR_LORA_DIR"):
            return TSDSRPipeline.from_release(
                os.environ.get("TSDSR_SD3", SD3_MEDIUM),
                os.environ["TSDSR_LORA_DIR"],
                os.environ.get("TSDSR_EMBEDS_DIR", os.environ["TSDSR_LORA_DIR"]),
                token=token,
                **kwargs,
            )
        if (bundled / "model_index.json").is_file():
            return load_pipeline(str(bundled), **kwargs)
        raise MissingWeightsError(
            "model_index.json",
            [f"${env} (unset)", str(bundled)],
            f"Set {env} to a folder or hub repo made by `python -m tinysr convert`, or pass --model PATH."
            + (" For the official TSD-SR layout set TSDSR_LORA_DIR and TSDSR_EMBEDS_DIR." if model == "tsdsr" else ""),
        )
    folder = resolve_folder(model, revision=revision, token=token)
    if not (folder / "model_index.json").is_file() and is_tinysr_release(folder):
        return TinySRPipeline.from_release(folder, os.environ.get("TINYSR_EMBEDS_DIR"), **kwargs)
    name = read_json(folder / "model_index.json").get("_class_name")
    if name not in PIPELINES:
        raise WrongModelError(f"{folder} holds a {name}; expected one of {', '.join(PIPELINES)}")
    return PIPELINES[name].from_pretrained(folder, **kwargs)


__all__ = ["OneStepSRPipeline", "SRResult", "TSDSRPipeline", "TinySRPipeline", "load_pipeline"]
