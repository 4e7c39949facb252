"""The path TinySR and TSD-SR share: bicubic x4, pad, encode, tiled one-step prediction, decode, colour fix.

Two recipes run it: ours (`default`) and the release scripts' (`official`, see tinysr/official.py).
Subclasses only say how to predict the noise (`predict`) and how they are stored.
"""

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from torchvision.transforms.functional import to_tensor

from ..color import COLOR_FIXES, apply_color_fix
from ..device import dtype_name, fallback_dtype, out_of_memory_as_error, parse_dtype, pick_device, timed
from ..errors import ImageError, NumericalError
from ..imageio import DEFAULT_MAX_PIXELS, as_loaded_image, to_pil
from ..official import (
    PROCESS_SIZE, RECIPES, UPSCALE, official_color_fix, official_lr, official_sizes, official_tiled_predict, quantize_like_script,
)
from ..tiling import tiled_map

SCALE = UPSCALE
MIN_INPUT_SIDE = PROCESS_SIZE // UPSCALE  # shorter inputs are enlarged first so the processed short side reaches 512
MAX_ENLARGED_SIDE = 8 * MIN_INPUT_SIDE  # but never stretched beyond this long side: thin inputs are padded instead
TIMESTEP = 1000.0


@dataclass
class SRResult:
    """The upscaled image (CHW float in [0, 1]) with per-stage seconds and the precision actually used."""

    image: torch.Tensor
    timings: dict = field(default_factory=dict)
    dtype: str = "fp32"
    alpha: torch.Tensor | None = None
    grayscale: bool = False
    bit_depth: int = 8

    @property
    def pil(self) -> Image.Image:
        return to_pil(self.image, self.alpha, self.grayscale, self.bit_depth)


def vae_encode(vae, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """The posterior mean for AutoencoderKL (a sample when `sample`, as the release scripts take), else the encoder output."""
    if isinstance(vae, AutoencoderKL):
        posterior = vae.encode(x).latent_dist
        return posterior.sample(generator) if sample else posterior.mean
    return vae.encode(x)


def vae_decode(vae, z: torch.Tensor) -> torch.Tensor:
    if isinstance(vae, AutoencoderKL):
        return vae.decode(z).sample
    return vae.decode(z)


def vae_downscale(vae) -> int:
    if isinstance(vae, AutoencoderKL):
        return 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.downscale


def processing_size(height: int, width: int) -> tuple[int, int]:
    """Bicubic target: x4, after enlarging inputs whose short side is under 128 towards 128, as far as a
    1024 px long side allows (a 2000x1 strip is not stretched to 256000x128; padding fills its short side)."""
    short, long = min(height, width), max(height, width)
    s = min(MIN_INPUT_SIDE / short, max(MAX_ENLARGED_SIDE / long, 1.0)) if short < MIN_INPUT_SIDE else 1.0
    return round(height * s) * SCALE, round(width * s) * SCALE


def check_processed_size(loaded, recipe: str, max_pixels: int) -> None:
    """Refuse, before allocating, work beyond what the largest accepted input costs (its 4x output)."""
    h, w = loaded.rgb.shape[-2:]
    ph, pw = official_sizes(w, h)[:2] if recipe == "official" else processing_size(h, w)
    limit = max(max_pixels * SCALE * SCALE, PROCESS_SIZE * MAX_ENLARGED_SIDE * SCALE)
    if ph * pw > limit:
        hint = " (it enlarges the short side to 128 px first); the default recipe pads thin images instead" if recipe == "official" else ""
        raise ImageError(
            f"this {w}x{h} image would be processed at {pw}x{ph} = {ph * pw / 1e6:.0f} MP by the {recipe} recipe{hint}; "
            f"the limit is {limit / 1e6:.1f} MP"
        )


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right by reflection (replication when the image is too small to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class OneStepSRPipeline:
    """One-step latent SR: z = E(x) * s, z_hr = z - eps(z), image = D(z_hr / s)."""

    default_color_fix = "adain"
    model_index_name = ""
    official_clamps_input = False  # the release scripts clamp the bicubic input to [-1, 1] for TSD-SR, not for TinySR

    def __init__(self, transformer, vae, *, device=None, dtype="fp32"):
        self.device = pick_device(device)
        self.dtype = parse_dtype(dtype)
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.to(self.device, self.dtype)

    # ----- what subclasses provide -----
    def predict(self, latent: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def latent_multiple(self) -> int:
        return self.transformer.config.patch_size

    @property
    def max_latent_tile(self) -> int:
        """The largest latent side the position table covers; larger tiles are reduced to it."""
        return self.transformer.config.pos_embed_max_size * self.transformer.config.patch_size

    # ----- shared machinery -----
    def to(self, device=None, dtype=None):
        self.device = pick_device(device) if device is not None else self.device
        self.dtype = parse_dtype(dtype) if dtype is not None else self.dtype
        for name, module in self.modules().items():
            if self.dtype == torch.float16:
                self._keep_fp16_overflows(name, module)
            # nn.Module.to: ModelMixin.to only adds a warning about fp32-pinned modules, which these lack
            torch.nn.Module.to(module, self.device, self.dtype)
            if self.dtype != torch.float16:
                self._restore_fp16_overflows(name, module)
        return self

    @torch.no_grad()
    def _keep_fp16_overflows(self, name: str, module) -> None:
        """Remember weights that fp16 cannot hold, so a later fallback starts from the true values."""
        kept = self.__dict__.setdefault("_fp16_overflows", {}).setdefault(name, {})
        limit = torch.finfo(torch.float16).max
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and tensor.dtype != torch.float16 and key not in kept:
                if tensor.abs().max() > limit:
                    kept[key] = tensor.detach().float().cpu().clone()

    @torch.no_grad()
    def _restore_fp16_overflows(self, name: str, module) -> None:
        state = module.state_dict()
        for key, value in self.__dict__.get("_fp16_overflows", {}).get(name, {}).items():
            state[key].copy_(value)

    def modules(self) -> dict:
        return {"transformer": self.transformer, "vae": self.vae}

    def num_parameters(self) -> dict:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules().items()}

    # the three stages, each tiled; `_run` chains them and the benchmark times them one by one
    def encode_latents(
        self, x: torch.Tensor, vae_tile_size: int | None = 128, vae_tile_overlap: int = 16, *,
        sample: bool = False, generator: torch.Generator | None = None, memory_format=torch.channels_last,
    ) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> scaled latent; `vae_tile_size=None` encodes in one piece."""
        x = x.to(self.device, self.dtype, memory_format=memory_format)

        def encode(t):
            return vae_encode(self.vae, t, sample, generator)

        z = encode(x) if vae_tile_size is None else tiled_map(encode, x, vae_tile_size, vae_tile_overlap, x_scale=vae_downscale(self.vae))
        return z * self.vae.config.scaling_factor

    def predict_tiled(self, z: torch.Tensor, tile_size: int = 64, tile_overlap: int = 8) -> torch.Tensor:
        """eps over Gaussian-blended latent tiles, no larger than the position table covers."""
        tile_size = min(tile_size, self.max_latent_tile)
        tile_size -= tile_size % self.latent_multiple
        return tiled_map(self.predict, z, tile_size, min(tile_overlap, tile_size // 2), align=self.latent_multiple)

    def decode_latents(
        self, z: torch.Tensor, vae_tile_size: int | None = 128, vae_tile_overlap: int = 16, *, memory_format=torch.channels_last
    ) -> torch.Tensor:
        z = (z / self.vae.config.scaling_factor).contiguous(memory_format=memory_format)

        def decode(t):
            return vae_decode(self.vae, t)

        return decode(z) if vae_tile_size is None else tiled_map(decode, z, vae_tile_size, vae_tile_overlap, y_scale=vae_downscale(self.vae))

    @torch.no_grad()
    def _run(self, x, recipe, tile_size, tile_overlap, vae_tile_size, vae_tile_overlap, seed, timings) -> torch.Tensor:
        """x: (1, 3, H, W) in [-1, 1] on the pipeline's device and dtype; returns the decoded [-1, 1] image.

        The official recipe runs the VAE in contiguous memory (channels-last convolutions round
        differently), samples AutoencoderKL's posterior and tiles the latent as the scripts do.
        """
        official = recipe == "official"
        # ours: convolutions run about 2x faster channels-last on CPU (and on tensor cores)
        memory_format = torch.contiguous_format if official else torch.channels_last
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        with timed(timings, "encode", self.device):
            z = self.encode_latents(
                x, vae_tile_size, vae_tile_overlap, sample=official, generator=generator, memory_format=memory_format
            )
        with timed(timings, "transformer", self.device):
            if official:
                z = z - official_tiled_predict(self.predict, z, tile_size, tile_overlap)
            else:
                z = z - self.predict_tiled(z, tile_size, tile_overlap)
        with timed(timings, "decode", self.device):
            return self.decode_latents(z, vae_tile_size, vae_tile_overlap, memory_format=memory_format)

    def __call__(
        self,
        image,
        *,
        recipe: str = "default",
        color_fix: str | None = None,
        tile_size: int = 64,
        tile_overlap: int = 8,
        vae_tile_size: int | None = None,
        vae_tile_overlap: int = 16,
        max_pixels: int | None = None,
        seed: int | None = None,
    ) -> SRResult:
        """Upscale x4. `image`: a path, PIL image, LoadedImage, or CHW float tensor in [0, 1].

        recipe "default" (ours): inputs of any size are padded, never distorted; the output is
        exactly 4x the input, alpha, grayscale and 16-bit kept; the VAE is tiled (128 latent px
        unless `vae_tile_size` says otherwise). recipe "official": the release scripts' arithmetic,
        8-bit RGB in and out, no VAE tiling unless `vae_tile_size` is given, TSD-SR's posterior
        sampled with `seed` (unseeded upstream). Tile sizes are in latent pixels (8 image pixels each).
        """
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        color_fix = color_fix or self.default_color_fix
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown colour fix {color_fix!r}; choose one of {', '.join(COLOR_FIXES)}")
        if tile_size < 2 * self.latent_multiple or tile_overlap < 0 or tile_overlap >= tile_size:
            raise ValueError(f"need tile_size >= {2 * self.latent_multiple} and 0 <= tile_overlap < tile_size")
        if recipe == "official" and tile_size > self.max_latent_tile:
            raise ValueError(f"tile_size {tile_size} exceeds the {self.max_latent_tile} latent pixels the position table covers")
        if vae_tile_size is None and recipe == "default":
            vae_tile_size = 128
        if vae_tile_size is not None and (vae_tile_size < 4 or vae_tile_overlap < 0 or vae_tile_overlap >= vae_tile_size):
            raise ValueError("need vae_tile_size >= 4 and 0 <= vae_tile_overlap < vae_tile_size")
        loaded = as_loaded_image(image, max_pixels)
        check_processed_size(loaded, recipe, max_pixels or DEFAULT_MAX_PIXELS)
        timings: dict = {}
        start = time.perf_counter()
        prepare, finish = (self._official_input, self._official_output) if recipe == "official" else (self._input, self._output)
        with out_of_memory_as_error(self.device):
            with timed(timings, "preprocess", self.device):
                x, context = prepare(loaded)
            args = (recipe, tile_size, tile_overlap, vae_tile_size, vae_tile_overlap, seed, timings)
            y = self._run(x, *args)
            if self.dtype == torch.float16 and self._fp16_failed(y, x):
                retry = fallback_dtype(self.device)
                warnings.warn(f"fp16 overflowed (NaN/inf or black output); switching to {dtype_name(retry)}", stacklevel=2)
                self.to(dtype=retry)
                for stage in ("encode", "transformer", "decode"):
                    timings.pop(stage)
                x, context = prepare(loaded)
                y = self._run(x, *args)
        if not torch.isfinite(y).all():
            raise NumericalError(f"the model produced NaN/inf in {dtype_name(self.dtype)}; check the weights")
        with timed(timings, "postprocess", self.device):
            result = finish(y, loaded, context, color_fix)
        timings["total"] = time.perf_counter() - start
        result.timings, result.dtype = timings, dtype_name(self.dtype)
        return result

    def _input(self, loaded):
        """Ours: bicubic x4 (short side to 512 first), clamped, padded to the latent grid."""
        rgb = loaded.rgb[None].float()
        size = processing_size(*rgb.shape[-2:])
        upscaled = F.interpolate(rgb, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        x = pad_to_multiple(upscaled * 2 - 1, vae_downscale(self.vae) * self.latent_multiple)
        return x.to(self.device, self.dtype), upscaled

    def _output(self, y, loaded, upscaled, color_fix) -> SRResult:
        ph, pw = upscaled.shape[-2:]
        y = ((y.float()[..., :ph, :pw].clamp(-1, 1) + 1) / 2).cpu()
        y = apply_color_fix(y, upscaled, color_fix)
        h, w = loaded.rgb.shape[-2:]
        out_size = (h * SCALE, w * SCALE)
        if (ph, pw) != out_size:
            y = F.interpolate(y, size=out_size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        alpha = None
        if loaded.alpha is not None:
            alpha = F.interpolate(loaded.alpha[None], size=out_size, mode="bicubic", align_corners=False).clamp(0, 1)[0]
        return SRResult(y[0], alpha=alpha, grayscale=loaded.grayscale, bit_depth=loaded.bit_depth)

    def _official_input(self, loaded):
        """The scripts' preprocessing: 8-bit RGB, their size rule, torch bicubic in the model's precision."""
        lr = official_lr(loaded)
        height, width, resized = official_sizes(lr.width, lr.height)
        x = to_tensor(lr)[None].to(self.device, self.dtype)
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False) * 2 - 1
        x = x.to(self.device, self.dtype)
        return (x.clamp(-1, 1) if self.official_clamps_input else x), (lr, resized)

    def _official_output(self, y, loaded, context, color_fix) -> SRResult:
        """ToPILImage truncation, PIL bicubic back to 4x when resized, colour fix on the PIL images."""
        lr, resized = context
        out = quantize_like_script(y[0].clamp(-1, 1).cpu() / 2 + 0.5)
        if resized:
            out = out.resize((lr.width * SCALE, lr.height * SCALE), Image.Resampling.BICUBIC)
        return SRResult(to_tensor(official_color_fix(out, lr, color_fix)))

    @staticmethod
    def _fp16_failed(y: torch.Tensor, x: torch.Tensor) -> bool:
        """NaN/inf, or one flat value (an overflow's black frame) from an input that is not flat."""
        return not bool(torch.isfinite(y).all()) or (float(y.std()) < 1e-4 and float(x.float().std()) > 1e-3)

    # ----- storage -----
    def save_pretrained(self, folder, *, dtype: str | None = None, push_to_hub: str | None = None, token=None) -> Path:
        """Our single-folder format: model_index.json + one subfolder per component (safetensors)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, module in self.modules().items():
            original = next(module.parameters()).dtype
            if dtype is not None:
                torch.nn.Module.to(module, parse_dtype(dtype))
            module.save_pretrained(folder / name, safe_serialization=True)
            torch.nn.Module.to(module, original)
        self._save_extras(folder)
        index = {"_class_name": self.model_index_name}
        index.update({name: [type(m).__module__.split(".")[0], type(m).__name__] for name, m in self.modules().items()})
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            api.create_repo(push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=push_to_hub, folder_path=str(folder))
        return folder

    def _save_extras(self, folder: Path) -> None:
        pass
