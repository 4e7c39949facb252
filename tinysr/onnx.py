"""ONNX: export a pipeline's three stages (transformer, VAE encoder, VAE decoder) and run them with onnxruntime.

Each stage is exported as the pipeline calls it (TSD-SR's fixed prompt and timestep become constants), with
dynamic batch, height and width, so the torch pipeline's pre/post-processing and tiling run unchanged around it.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from .device import pick_device
from .errors import MissingWeightsError, UnsupportedOption, WrongModelError, require
from .pipelines.base import OneStepSRPipeline, token_pattern_option, vae_decode, vae_downscale, vae_encode

CONFIG_NAME = "onnx_pipeline.json"
STAGES = ("transformer", "vae_encoder", "vae_decoder")


class _Stage(torch.nn.Module):
    """One pipeline stage as a module, so torch.onnx sees the pipeline's own call."""

    def __init__(self, fn, owner: torch.nn.Module):
        super().__init__()
        self.fn, self.owner = fn, owner

    def forward(self, x):
        return self.fn(x)


def export_onnx(pipe: OneStepSRPipeline, folder: str | os.PathLike, opset: int = 18) -> Path:
    """Write transformer.onnx, vae_encoder.onnx, vae_decoder.onnx and onnx_pipeline.json (fp32 graphs).

    The pipeline is left on the CPU in fp32 (its float weights are what is exported)."""
    from torch.export import Dim

    require("onnxscript")  # torch.onnx's exporter
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.to("cpu", "fp32")
    multiple, down = pipe.latent_multiple, vae_downscale(pipe.vae)
    side = min(32, pipe.max_latent_tile)
    channels = pipe.transformer.config.in_channels
    latent = torch.randn(2, channels, side, side)
    image = torch.rand(2, 3, side * down, side * down) * 2 - 1
    batch = Dim("batch", min=1, max=1024)
    tile_h, tile_w = Dim("tile_h", min=1, max=pipe.max_latent_tile // multiple), Dim("tile_w", min=1, max=pipe.max_latent_tile // multiple)
    h, w = Dim("h", min=1, max=4096), Dim("w", min=1, max=4096)
    stages = {
        "transformer": (pipe.predict, pipe.transformer, latent, {0: batch, 2: multiple * tile_h, 3: multiple * tile_w}),
        "vae_encoder": (lambda x: vae_encode(pipe.vae, x), pipe.vae, image, {0: batch, 2: down * h, 3: down * w}),
        "vae_decoder": (lambda z: vae_decode(pipe.vae, z), pipe.vae, latent, {0: batch, 2: h, 3: w}),
    }
    for name, (fn, owner, example, shapes) in stages.items():
        with torch.no_grad():
            program = torch.onnx.export(
                _Stage(fn, owner).eval(), (example,), dynamo=True, dynamic_shapes={"x": shapes},
                input_names=["x"], output_names=["y"], opset_version=opset, verbose=False, optimize=False,  # onnxruntime optimizes at load
            )
        program.save(str(folder / f"{name}.onnx"))  # weights go to a side file past protobuf's 2 GB
    config = {
        "pipeline": type(pipe).__name__,
        "default_color_fix": pipe.default_color_fix,
        "official_clamps_input": pipe.official_clamps_input,
        "remove_token_pattern": pipe.remove_token_pattern,
        "samples_posterior": type(pipe.vae).__name__ == "AutoencoderKL",
        "latent_multiple": multiple,
        "max_latent_tile": pipe.max_latent_tile,
        "vae_downscale": down,
        "scaling_factor": pipe.vae.config.scaling_factor,
        "num_parameters": pipe.num_parameters(),
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def is_onnx_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


class OnnxStage:
    """An onnxruntime session called like the torch module it was exported from."""

    def __init__(self, path: Path, providers: list[str]):
        ort = require("onnxruntime")
        self.session = ort.InferenceSession(str(path), providers=providers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.session.run(None, {"x": x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(y).to(x.device, x.dtype)


class OnnxVAE:
    """The exported encoder and decoder behind the interface the pipeline's VAE helpers use."""

    def __init__(self, encoder: OnnxStage, decoder: OnnxStage, downscale: int, scaling_factor: float):
        self.encode, self.decode, self.downscale = encoder, decoder, downscale
        self.config = SimpleNamespace(scaling_factor=scaling_factor)


class OnnxPipeline(OneStepSRPipeline):
    """A folder written by `export_onnx`, run by onnxruntime (CPU, or CUDA when its provider is installed); fp32."""

    model_index_name = "OnnxPipeline"

    def __init__(self, folder: str | os.PathLike, *, device=None, dtype="fp32"):
        self.folder = Path(folder)
        if not is_onnx_folder(self.folder):
            raise MissingWeightsError(CONFIG_NAME, [str(self.folder)], "Write the folder with `python -m tinysr export-onnx MODEL -o DIR`.")
        self.config = json.loads((self.folder / CONFIG_NAME).read_text())
        self.default_color_fix = self.config["default_color_fix"]
        self.official_clamps_input = self.config["official_clamps_input"]
        self.remove_token_pattern = token_pattern_option(self.config, self.folder / CONFIG_NAME)  # absent from earlier exports
        self._float_models = {}
        self.device = pick_device(device)
        self.to(self.device, dtype)

    def to(self, device=None, dtype=None):
        if dtype not in (None, "auto", "fp32", torch.float32):
            raise UnsupportedOption("the ONNX backend runs the exported fp32 graphs; use precision fp32")
        self.device = pick_device(device) if device is not None else self.device
        self.precision, self.dtype = "fp32", torch.float32
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in require("onnxruntime").get_available_providers():
                raise UnsupportedOption("onnxruntime here has no CUDA provider; install onnxruntime-gpu or use --device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        elif self.device.type != "cpu":
            raise UnsupportedOption(f"the ONNX backend runs on cpu or cuda, not {self.device.type}")
        stages = {}
        for name in STAGES:
            path = self.folder / f"{name}.onnx"
            if not path.is_file():
                raise MissingWeightsError(path.name, [str(self.folder)], "The export is incomplete; run `python -m tinysr export-onnx` again.")
            stages[name] = OnnxStage(path, providers)
        self.transformer = stages["transformer"]
        self.vae = OnnxVAE(stages["vae_encoder"], stages["vae_decoder"], self.config["vae_downscale"], self.config["scaling_factor"])
        return self

    @property
    def latent_multiple(self) -> int:
        return self.config["latent_multiple"]

    @property
    def max_latent_tile(self) -> int:
        return self.config["max_latent_tile"]

    def predict(self, latent):
        return self.transformer(latent)

    def modules(self) -> dict:
        return {}

    def num_parameters(self) -> dict:
        return dict(self.config["num_parameters"])

    def upscale_batch(self, images: list, *, recipe: str = "default", **options):
        if recipe == "official" and self.config["samples_posterior"]:
            raise UnsupportedOption("the official recipe samples TSD-SR's VAE posterior, which the exported encoder does not; use the default recipe")
        return super().upscale_batch(images, recipe=recipe, **options)

    def save_pretrained(self, *args, **kwargs):
        raise WrongModelError("an ONNX folder is already exported; save the torch pipeline it came from instead")
