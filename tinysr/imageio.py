"""Reading photos the way users have them (any Pillow format, EXIF rotation, alpha, 16-bit, grayscale)."""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

DEFAULT_MAX_PIXELS = 4096 * 4096


@dataclass
class LoadedImage:
    """RGB in [0, 1] (float32, CHW), plus what is needed to write the result back in kind."""

    rgb: torch.Tensor
    alpha: torch.Tensor | None
    grayscale: bool
    bit_depth: int
    orientation: int = 1  # the EXIF orientation tag, already applied to `rgb`


def _to_float_array(im: Image.Image) -> tuple[np.ndarray, int]:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        return arr / (65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0), 16
    if im.mode == "F":
        return np.clip(np.asarray(im, dtype=np.float32), 0, 1), 16
    return np.asarray(im, dtype=np.float32) / 255.0, 8


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Open, check size from the header before decoding, apply EXIF orientation, split alpha."""
    name = source if isinstance(source, (str, Path)) else getattr(source, "name", "image")
    try:
        im = source if isinstance(source, Image.Image) else Image.open(source)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ImageError(f"{name}: cannot open ({e.strerror or e})") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: image is larger than {max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None
    w, h = im.size
    if w == 0 or h == 0:
        raise ImageError(f"{name}: image has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (raise --max-pixels)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None

    alpha = None
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        alpha = torch.from_numpy(np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0)[None]
    grayscale = im.mode in ("L", "LA", "La", "1", "I", "I;16", "I;16B", "I;16L", "F")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        gray, depth = _to_float_array(im)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
    else:
        rgb, depth = _to_float_array(im.convert("RGB"))
    return LoadedImage(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1), alpha, grayscale, depth, orientation)


def as_loaded_image(image, max_pixels: int | None = None) -> LoadedImage:
    """A path, PIL image, LoadedImage, or (3, H, W) float tensor in [0, 1], as a LoadedImage."""
    if isinstance(image, LoadedImage):
        return image
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) == 0:
            raise ImageError(f"expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
        return LoadedImage(image.detach().float().cpu().clamp(0, 1), None, False, 8)
    return load_image(image, max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)


def to_pil(rgb: torch.Tensor, alpha: torch.Tensor | None = None, grayscale: bool = False, bit_depth: int = 8) -> Image.Image:
    """CHW float in [0, 1] back to Pillow: grayscale inputs stay grayscale (16-bit stays 16-bit)."""
    arr = rgb.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
    if grayscale:
        gray = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if bit_depth == 16 and alpha is None:
            return Image.fromarray(np.round(gray * 65535).astype(np.uint16))
        im = Image.fromarray(np.round(gray * 255).astype(np.uint8), "L")
    else:
        im = Image.fromarray(np.round(arr * 255).astype(np.uint8), "RGB")
    if alpha is not None:
        a = Image.fromarray(np.round(alpha[0].clamp(0, 1).cpu().numpy() * 255).astype(np.uint8), "L")
        im.putalpha(a)
    return im


IMAGE_SUFFIXES = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand folders (non-recursively, sorted) into image files; files are taken as given."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(item)
    return found
