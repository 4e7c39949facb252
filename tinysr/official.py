"""The release scripts' recipe (`test/test_tinysr.py`, `test/test_tsdsr.py`), operation for operation.

`recipe="official"` in the pipelines uses these pieces so that, for the same weights, its 8-bit
output is the PNG the authors' script saves. Where the scripts differ from our default recipe is
listed in the README's Fidelity section.
"""

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image, to_tensor

from .color import adain_color_fix, wavelet_color_fix
from .imageio import LoadedImage, to_pil
from .tiling import gaussian_tile_weights

RECIPES = ("default", "official")  # ours, and the release scripts'
UPSCALE = 4
PROCESS_SIZE = 512  # the scripts' output short side for small inputs; ours too


# undoes ImageOps.exif_transpose: the scripts' Image.open().convert("RGB") ignores the orientation tag
UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
}


def official_lr(loaded: LoadedImage) -> Image.Image:
    """The LR as the scripts see it: 8-bit RGB, stored orientation (16-bit inputs are scaled here, clipped there)."""
    lr = to_pil(loaded.rgb)
    return lr.transpose(UNDO_ORIENTATION[loaded.orientation]) if loaded.orientation in UNDO_ORIENTATION else lr


def official_sizes(width: int, height: int) -> tuple[int, int, bool]:
    """(height, width) of the bicubic target, and whether the output is PIL-resized back to 4x the input.

    Inputs with a side under 128 are enlarged so the short side reaches 128 (int() truncation),
    then x4, then each side is trimmed to a multiple of 8.
    """
    resized = False
    if width < PROCESS_SIZE // UPSCALE or height < PROCESS_SIZE // UPSCALE:
        scale = (PROCESS_SIZE // UPSCALE) / min(width, height)
        width, height = int(scale * width), int(scale * height)
        resized = True
    width, height = UPSCALE * width, UPSCALE * height
    if width % 8 or height % 8:
        resized = True
        width, height = width - width % 8, height - height % 8
    return height, width, resized


def official_tile_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: stride tile - overlap, the last tile flush with the end."""
    count, end = 0, 0
    while end < length:
        end = max(count * tile - overlap * count, 0) + tile
        count += 1
    return [max(i * tile - overlap * i, 0) for i in range(count - 1)] + [length - tile]


def official_tiled_predict(predict: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """The scripts' `tile_sample`: one call when h*w <= tile^2, else tiles of min(tile, h, w) one at a time.

    The script looks as if it batched a row of tiles, but it empties its list after every call, so
    each tile runs alone; tiles are visited x-major and blended in float32 with float64 weights
    whose y midpoint is H/2 (x: (W-1)/2), exactly in that order.
    """
    _, _, h, w = z.shape
    if h * w <= tile * tile:
        return predict(z).to(z.dtype)
    tile = min(tile, h, w)
    if overlap >= tile:  # the script loops for ever here
        raise ValueError(f"tile overlap {overlap} must be smaller than the tile, here {tile} latent pixels (the latent's short side)")
    if z.device.type == "mps":
        raise ValueError("the official recipe blends tiles in float64, which MPS lacks; use device cpu or cuda")
    weights = gaussian_tile_weights(tile, tile, y_midpoint=tile / 2).to(z.device)[None, None]
    boxes = [(y, x) for x in official_tile_offsets(w, tile, overlap) for y in official_tile_offsets(h, tile, overlap)]
    preds = [predict(z[:, :, y : y + tile, x : x + tile].contiguous()) for y, x in boxes]  # the script's torch.cat copies
    total = torch.zeros(z.shape, device=z.device)
    contributors = torch.zeros(z.shape, device=z.device)
    for (y, x), pred in zip(boxes, preds):
        total[:, :, y : y + tile, x : x + tile] += pred * weights
        contributors[:, :, y : y + tile, x : x + tile] += weights
    total /= contributors
    return total.to(z.dtype)


def quantize_like_script(image: torch.Tensor) -> Image.Image:
    """ToPILImage of a [0, 1] CHW tensor: x * 255, truncated (not rounded) to 8 bits.

    The scripts run fp16 or fp32; bf16 (`auto` on a CPU with native bf16) has no numpy type, so it is
    widened to fp32 first, which is exact."""
    return to_pil_image(image.float() if image.dtype == torch.bfloat16 else image)


def official_color_fix(output: Image.Image, lr: Image.Image, method: str) -> Image.Image:
    """AdaIN against the original LR, wavelet against the PIL-bicubic x4 LR; each truncates to 8 bits again."""
    if method == "none":
        return output
    if method == "adain":
        fixed = adain_color_fix(to_tensor(output)[None], to_tensor(lr)[None])
    else:
        reference = lr.resize((lr.width * UPSCALE, lr.height * UPSCALE), Image.Resampling.BICUBIC)
        fixed = wavelet_color_fix(to_tensor(output)[None], to_tensor(reference)[None])
    return quantize_like_script(fixed[0])
