"""The path TinySR and TSD-SR share: bicubic x4, pad, encode, tiled one-step prediction, decode, colour fix.

Two recipes run it: ours (`default`) and the release scripts' (`official`, see tinysr/official.py).
Subclasses only say how to predict the noise (`predict`) and how they are stored.
"""

import copy
import json
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from torchvision.transforms.functional import to_tensor

from ..attention import cpu_attention
from ..color import COLOR_FIXES, apply_color_fix
from ..device import dtype_name, fallback_dtype, free_memory_bytes, out_of_memory_as_error, parse_dtype, pick_device, resolve_precision, timed
from ..errors import ImageError, NumericalError, WrongModelError
from ..imageio import DEFAULT_MAX_PIXELS, as_loaded_image, to_pil
from ..lattice import without_lattice
from ..models import PatchAutoencoder, TinyAutoencoder
from ..official import (
    PROCESS_SIZE,
    RECIPES,
    UPSCALE,
    official_color_fix,
    official_lr,
    official_sizes,
    official_tiled_predict,
    quantize_like_script,
)
from ..quantization import CompiledInt8, Int8Transformer, quantize_linears_int8
from ..tiling import tiled_map
from ..weights import read_json

SCALE = UPSCALE
MIN_INPUT_SIDE = PROCESS_SIZE // UPSCALE  # shorter inputs are enlarged first so the processed short side reaches 512
MAX_ENLARGED_SIDE = 8 * MIN_INPUT_SIDE  # but never stretched beyond this long side: thin inputs are padded instead
TIMESTEP = 1000.0

# the VAEs a pipeline folder may name: SD3's, the demo teacher's (trains in CPU minutes) and the tiny one
VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "PatchAutoencoder": PatchAutoencoder, "TinyAutoencoder": TinyAutoencoder}


@dataclass
class SRResult:
    """The upscaled image (CHW float in [0, 1]) with per-stage seconds and the precision actually used."""

    image: torch.Tensor
    timings: dict = field(default_factory=dict)
    dtype: str = "fp32"
    alpha: torch.Tensor | None = None
    grayscale: bool = False
    bit_depth: int = 8
    batch_size: int = 1  # images that went through the models together (timings are the batch's)

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


@contextmanager
def weights_as(module: torch.nn.Module, dtype: torch.dtype | None):
    """The module's float tensors briefly swapped for `dtype` copies, so saving in another precision leaves the
    running model as it was (casting in place and back would round it)."""
    swapped = []
    for tensor in [*module.parameters(), *module.buffers()]:
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            swapped.append((tensor, tensor.data))
            tensor.data = tensor.data.to(dtype)
    try:
        yield
    finally:
        for tensor, data in swapped:
            tensor.data = data


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right by reflection (replication when the image is too small to reflect)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def token_pattern_option(config: dict, where: Path) -> bool:
    """`remove_token_pattern` from a saved pipeline's JSON (absent: off, as in the releases)."""
    value = config.get("remove_token_pattern", False)
    if not isinstance(value, bool):
        raise WrongModelError(f"{where}: remove_token_pattern must be true or false, got {value!r}")
    return value


class OneStepSRPipeline:
    """One-step latent SR: z = E(x) * s, z_hr = z - eps(z), image = D(z_hr / s)."""

    default_color_fix = "adain"
    model_index_name = ""
    official_clamps_input = False  # the release scripts clamp the bicubic input to [-1, 1] for TSD-SR, not for TinySR

    def __init__(self, transformer, vae, *, device=None, dtype="fp32", remove_token_pattern: bool = False):
        """`dtype`: fp32, fp16, bf16, int8 (the transformer's linears in dynamic int8, CPU) or auto (see `resolve_precision`).
        `remove_token_pattern`: see `without_token_pattern`; saved in model_index.json; off for the releases."""
        self.remove_token_pattern = remove_token_pattern
        self.device = pick_device(device)
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self._float_models = {}  # while int8 runs: the fp32 transformer and VAE whose copies run
        self.to(self.device, dtype)

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
        """Move and cast in place; int8 runs copies beside the fp32 models (an int8 transformer, the VAE in the CPU's
        faster float: bf16 where native, as `auto` picks), which any other precision drops again."""
        self.device = pick_device(device) if device is not None else self.device
        if isinstance(dtype, torch.dtype):
            dtype = dtype_name(parse_dtype(dtype))
        self.precision = resolve_precision(dtype or self.precision, self.device)
        int8 = self.precision == "int8"
        self.dtype = parse_dtype(resolve_precision("auto", self.device) if int8 else self.precision)
        if self._float_models:
            self.transformer, self.vae = self._float_models.pop("transformer"), self._float_models.pop("vae")
        cast = torch.float32 if int8 else self.dtype
        for name, module in self.modules().items():
            if cast == torch.float16:
                self._keep_fp16_overflows(name, module)
            # nn.Module.to: ModelMixin.to only adds a warning about fp32-pinned modules, which these lack
            torch.nn.Module.to(module, self.device, cast)
            if cast != torch.float16:
                self._restore_fp16_overflows(name, module)
        if int8:
            self._float_models = {"transformer": self.transformer, "vae": self.vae}
            self.transformer = Int8Transformer(quantize_linears_int8(self.transformer))
            if self.dtype != torch.float32:
                self.vae = torch.nn.Module.to(copy.deepcopy(self.vae), self.dtype)
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

    def compile(self, mode: str | None = None):
        """torch.compile the transformer and the VAE's encoder and decoder in place; the first image of each new
        size pays the compilation.

        On CUDA, CUDA graphs (`reduce-overhead`). On the CPU inductor's freezing is switched on for the process
        (it changes only graphs compiled without gradients, and `torch.compile(options=...)` did not apply it
        here): it folds the weights into the graph, prepacked for oneDNN, and fuses each linear with its GELU.
        Paper-size TinySR's bf16 transformer on a 2-core Xeon with AMX: 0.64 s eager or compiled without
        freezing, 0.55 s with it.

        SD3's VAE (AutoencoderKL) stays eager on the CPU, where inductor made it slower (paper size, bf16, encode /
        decode: 0.81 / 1.43 s eager, 0.91 / 1.83 compiled). With int8 the transformer becomes a `CompiledInt8` of the
        float one (torchao's int8 linears lowered by inductor to oneDNN, the rest in the VAE's float dtype).
        """
        cpu = self.device.type == "cpu"
        if cpu:
            import torch._inductor.config

            torch._inductor.config.freezing = True
        mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        vae_parts = [] if cpu and isinstance(self.vae, AutoencoderKL) else ("encoder", "decoder")
        modules = [getattr(self.vae, part) for part in vae_parts if hasattr(self.vae, part)]
        if self.precision == "int8":
            self.transformer = CompiledInt8(self._float_models["transformer"], self.dtype)
        else:
            modules.append(self.transformer)
        for module in modules:
            module.compile(mode=mode, dynamic=False)
        return self

    def modules(self) -> dict:
        """The float models (what is saved and counted, also while int8 runs)."""
        return dict(self._float_models) or {"transformer": self.transformer, "vae": self.vae}

    def num_parameters(self) -> dict:
        return {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules().items()}

    # the three stages, each tiled; `_run` chains them and the benchmark times them one by one
    def encode_latents(
        self, x: torch.Tensor, vae_tile_size: int | None = 128, vae_tile_overlap: int = 16, *,
        sample: bool = False, generator: torch.Generator | None = None, memory_format=torch.channels_last, tile_batch: int = 1,
    ) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> scaled latent; `vae_tile_size=None` encodes in one piece."""
        x = x.to(self.device, self.dtype, memory_format=memory_format)

        def encode(t):
            return vae_encode(self.vae, t, sample, generator)

        if vae_tile_size is None:
            z = encode(x)
        else:
            # a sampled posterior draws its noise per call: a batch that followed the free memory would change a seeded image
            budget = None if sample else self.tile_memory_budget
            z = tiled_map(encode, x, vae_tile_size, vae_tile_overlap, x_scale=vae_downscale(self.vae), batch=tile_batch, memory_budget=budget)
        return z * self.vae.config.scaling_factor

    def predict_tiled(self, z: torch.Tensor, tile_size: int = 64, tile_overlap: int = 8, tile_batch: int = 1) -> torch.Tensor:
        """eps over Gaussian-blended latent tiles, no larger than the position table covers."""
        tile_size = min(tile_size, self.max_latent_tile)
        tile_size -= tile_size % self.latent_multiple
        overlap = min(tile_overlap, tile_size // 2)
        eps = tiled_map(
            self.predict_with_measured_attention, z, tile_size, overlap,
            align=self.latent_multiple, batch=tile_batch, memory_budget=self.tile_memory_budget,
        )
        return self.without_token_pattern(eps)

    def predict_with_measured_attention(self, latent: torch.Tensor) -> torch.Tensor:
        """`predict`, with half-precision attention on the CPU in the kernel measured fastest there (tinysr.attention)."""
        with cpu_attention() if self.device.type == "cpu" and self.dtype != torch.float32 else nullcontext():
            return self.predict(latent)

    def without_token_pattern(self, eps: torch.Tensor) -> torch.Tensor:
        """With `remove_token_pattern`, eps less its per-image mean pattern over the positions inside a token.

        A small transformer's errors carry a per-image offset for each position inside its token, which an
        accurate decoder draws as a dot grid at the token period (the demo teacher: lattice 1.41 -> 1.21 on
        the synthetic set, PSNR and ST-LPIPS unchanged; docs/demo-weights.md). Only those p*p - 1 frequencies per channel change
        (p the patch size); the mean is taken in fp32 whatever the model's precision.
        """
        if not self.remove_token_pattern:
            return eps
        return without_lattice(eps.float(), self.latent_multiple).to(eps.dtype)

    def decode_latents(
        self, z: torch.Tensor, vae_tile_size: int | None = 128, vae_tile_overlap: int = 16, *,
        memory_format=torch.channels_last, tile_batch: int = 1,
    ) -> torch.Tensor:
        z = (z / self.vae.config.scaling_factor).contiguous(memory_format=memory_format)

        def decode(t):
            return vae_decode(self.vae, t)

        if vae_tile_size is None:
            return decode(z)
        return tiled_map(
            decode, z, vae_tile_size, vae_tile_overlap, y_scale=vae_downscale(self.vae), batch=tile_batch, memory_budget=self.tile_memory_budget
        )

    @torch.no_grad()
    def _run(self, x, recipe, tile_size, tile_overlap, vae_tile_size, vae_tile_overlap, seed, timings, tile_batch=1) -> torch.Tensor:
        """x: (N, 3, H, W) in [-1, 1] on the pipeline's device and dtype; returns the decoded [-1, 1] images.

        The official recipe runs the VAE in contiguous memory (channels-last convolutions round
        differently), samples AutoencoderKL's posterior and tiles the latent as the scripts do.
        """
        official = recipe == "official"
        # ours: convolutions run about 2x faster channels-last on CPU (and on tensor cores)
        memory_format = torch.contiguous_format if official else torch.channels_last
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        vae_tile_batch = self.vae_tile_batch(tile_batch)
        with timed(timings, "encode", self.device):
            z = self.encode_latents(
                x, vae_tile_size, vae_tile_overlap, sample=official, generator=generator, memory_format=memory_format, tile_batch=vae_tile_batch
            )
        with timed(timings, "transformer", self.device):
            if official:
                # the scripts' own attention kernel: this recipe is for matching their output, not for speed
                z = z - self.without_token_pattern(official_tiled_predict(self.predict, z, tile_size, tile_overlap))
            else:
                z = z - self.predict_tiled(z, tile_size, tile_overlap, tile_batch)
        with timed(timings, "decode", self.device):
            return self.decode_latents(z, vae_tile_size, vae_tile_overlap, memory_format=memory_format, tile_batch=vae_tile_batch)

    def default_tile_batch(self) -> int:
        """Most tiles per transformer pass (and VAE pass on a GPU): 16 on a GPU (one tile leaves it waiting on kernel
        launches), 8 on the CPU (the demo transformers' small matmuls: 1.7x faster on 2 cores, the same output; batches
        of whole images were not)."""
        return 16 if self.device.type == "cuda" else 8

    def vae_tile_batch(self, tile_batch: int) -> int:
        """The VAEs' tiles per pass: `tile_batch` on a GPU, one on the CPU, where their convolutions wait on memory and a
        batch only adds to it (a 2048 px output, 2 cores: paper-size TinySR's encode and decode 2.3x and 2.5x slower in
        batches of 8, SD3's decoder 1.7x slower with 5x the memory; README)."""
        return 1 if self.device.type == "cpu" else tile_batch

    def tile_memory_budget(self) -> int:
        """Bytes a batch of tiles may take: half of what is free, leaving the rest to the blended output and the next stage."""
        return free_memory_bytes(self.device) // 2

    def __call__(self, image, **options) -> SRResult:
        """Upscale x4. `image`: a path, PIL image, LoadedImage, or CHW float tensor in [0, 1].

        recipe "default" (ours): inputs of any size are padded, never distorted; the output is
        exactly 4x the input, alpha, grayscale and 16-bit kept; the VAE is tiled (128 latent px
        unless `vae_tile_size` says otherwise). recipe "official": the release scripts' arithmetic,
        8-bit RGB in and out, no VAE tiling unless `vae_tile_size` is given, TSD-SR's posterior
        sampled with `seed` (unseeded upstream). Tile sizes are in latent pixels (8 image pixels each; `tile_size` defaults to 64, or less if the position table covers less);
        up to `tile_batch` tiles go through the transformer at once, and through the VAE on a GPU (`vae_tile_batch`), fewer
        where half the free memory would not hold them (default: `default_tile_batch`).
        """
        return self.upscale_batch([image], **options)[0]

    def upscale_batch(
        self,
        images: list,
        *,
        recipe: str = "default",
        color_fix: str | None = None,
        tile_size: int | None = None,
        tile_overlap: int = 8,
        vae_tile_size: int | None = None,
        vae_tile_overlap: int = 16,
        max_pixels: int | None = None,
        seed: int | None = None,
        tile_batch: int | None = None,
    ) -> list[SRResult]:
        """Upscale several images (options as `__call__`); those of one processing size run as one batch,
        for GPU throughput. Each result's timings are its batch's; the official recipe runs one image at a time."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        color_fix = color_fix or self.default_color_fix
        if color_fix not in COLOR_FIXES:
            raise ValueError(f"unknown colour fix {color_fix!r}; choose one of {', '.join(COLOR_FIXES)}")
        tile_size = tile_size or min(64, self.max_latent_tile)  # 64: the release scripts' tile, when the position table covers it
        if tile_size < 2 * self.latent_multiple or tile_overlap < 0 or tile_overlap >= tile_size:
            raise ValueError(f"need tile_size >= {2 * self.latent_multiple} and 0 <= tile_overlap < tile_size")
        if recipe == "official" and tile_size > self.max_latent_tile:
            raise ValueError(f"tile_size {tile_size} exceeds the {self.max_latent_tile} latent pixels the position table covers")
        if vae_tile_size is None and recipe == "default":
            vae_tile_size = 128
        if vae_tile_size is not None and (vae_tile_size < 4 or vae_tile_overlap < 0 or vae_tile_overlap >= vae_tile_size):
            raise ValueError("need vae_tile_size >= 4 and 0 <= vae_tile_overlap < vae_tile_size")
        if tile_batch is not None and tile_batch < 1:
            raise ValueError("need tile_batch >= 1")
        tile_batch = tile_batch or self.default_tile_batch()
        loaded = [as_loaded_image(image, max_pixels) for image in images]
        for one in loaded:
            check_processed_size(one, recipe, max_pixels or DEFAULT_MAX_PIXELS)
            if recipe == "official" and color_fix == "adain" and tuple(one.rgb.shape[-2:]) == (1, 1):
                # the scripts' AdaIN takes the LR's unbiased variance: NaN, a black image, from one pixel
                raise ImageError("a 1-pixel image has no colour spread for the official recipe's AdaIN colour fix; "
                                 "use the default recipe, or color fix wavelet or none")
        prepare, finish = (self._official_input, self._official_output) if recipe == "official" else (self._input, self._output)
        groups: dict = {}
        for i, one in enumerate(loaded):
            key = i if recipe == "official" else processing_size(*one.rgb.shape[-2:])
            groups.setdefault(key, []).append(i)
        args = (recipe, tile_size, tile_overlap, vae_tile_size, vae_tile_overlap, seed)
        results: list = [None] * len(loaded)
        for indices in groups.values():
            for i, result in zip(indices, self._upscale_group([loaded[i] for i in indices], prepare, finish, args, color_fix, tile_batch)):
                results[i] = result
        return results

    def _upscale_group(self, loaded: list, prepare, finish, args, color_fix, tile_batch) -> list[SRResult]:
        """Images of one processing size through the models together (fp16 overflow: the whole batch again)."""
        timings: dict = {}
        start = time.perf_counter()
        with out_of_memory_as_error(self.device, "this image" if len(loaded) == 1 else f"this batch of {len(loaded)} images"):
            with timed(timings, "preprocess", self.device):
                x, contexts = self._prepare_batch(loaded, prepare)
            y = self._run(x, *args, timings, tile_batch)
            if self.dtype == torch.float16 and self._fp16_failed(y, x):
                retry = fallback_dtype(self.device)
                warnings.warn(f"fp16 overflowed (NaN/inf or black output); switching to {dtype_name(retry)}", stacklevel=3)
                self.to(dtype=retry)
                for stage in ("encode", "transformer", "decode"):
                    timings.pop(stage)
                x, contexts = self._prepare_batch(loaded, prepare)
                y = self._run(x, *args, timings, tile_batch)
        if not torch.isfinite(y).all():
            raise NumericalError(f"the model produced NaN/inf in {self.precision}; check the weights")
        with timed(timings, "postprocess", self.device):
            results = [finish(y[i : i + 1], one, context, color_fix) for i, (one, context) in enumerate(zip(loaded, contexts))]
        timings["total"] = time.perf_counter() - start
        for result in results:
            result.timings, result.dtype, result.batch_size = dict(timings), self.precision, len(loaded)
        return results

    @staticmethod
    def _prepare_batch(loaded: list, prepare) -> tuple[torch.Tensor, list]:
        prepared = [prepare(one) for one in loaded]
        return torch.cat([x for x, _ in prepared]), [context for _, context in prepared]

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
    def save_pretrained(self, folder, *, dtype: str | None = None, push_to_hub: str | None = None, token=None, model_card: str | None = None) -> Path:
        """Our single-folder format: model_index.json + one subfolder per component (safetensors), README.md from `model_card`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, module in self.modules().items():
            with weights_as(module, None if dtype is None else parse_dtype(dtype)):
                module.save_pretrained(folder / name, safe_serialization=True)
            config = folder / name / "config.json"
            values = json.loads(config.read_text())
            if values.pop("_name_or_path", None) is not None:  # where this machine loaded it from, not part of the model
                config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
        self._save_extras(folder)
        index = {"_class_name": self.model_index_name}
        if self.remove_token_pattern:
            index["remove_token_pattern"] = True
        index.update({name: [type(m).__module__.split(".")[0], type(m).__name__] for name, m in self.modules().items()})
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if model_card is not None:
            (folder / "README.md").write_text(model_card)
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            api.create_repo(push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=push_to_hub, folder_path=str(folder))
        return folder

    def _save_extras(self, folder: Path) -> None:
        pass

    @classmethod
    def _index_options(cls, folder: Path) -> dict:
        """model_index.json checked for this pipeline's class; the pipeline options it holds."""
        index = read_json(folder / "model_index.json")
        if index.get("_class_name") != cls.model_index_name:
            raise WrongModelError(f"{folder} holds a {index.get('_class_name')}, not a {cls.model_index_name}")
        return {"remove_token_pattern": token_pattern_option(index, folder / "model_index.json")}
