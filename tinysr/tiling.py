"""Overlapping tiles blended with Gaussian weights, for the transformer and both VAEs.

Tile positions live on the latent grid; `x_scale`/`y_scale` map them onto the input and output
grids, so one function tiles the transformer (1, 1), a VAE encoder (8, 1) and a decoder (1, 8).
"""

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch

from .device import PeakMemory


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets covering [0, length): stride tile - overlap, last tile flush with the end."""
    if length <= tile:
        return [0]
    stride = max(tile - overlap, align)
    stride -= stride % align
    starts = list(range(0, length - tile, stride))
    last = length - tile
    if not starts or starts[-1] != last:
        starts.append(last)
    return starts


def gaussian_tile_weights(height: int, width: int, var: float = 0.01, y_midpoint: float | None = None) -> torch.Tensor:
    """Separable Gaussian bump peaking at the tile centre, float64 (MultiDiffusion-style SR tiling).

    Computed value by value with numpy's scalar exp, as the release scripts do; they put the y
    midpoint at H/2 (`y_midpoint`), ours is (H-1)/2 like x.
    """

    def bump(n: int, mid: float) -> list:
        return [np.exp(-(i - mid) * (i - mid) / (n * n) / (2 * var)) / np.sqrt(2 * np.pi * var) for i in range(n)]

    y_mid = (height - 1) / 2 if y_midpoint is None else y_midpoint
    return torch.from_numpy(np.outer(bump(height, y_mid), bump(width, (width - 1) / 2)))


def tile_boxes(height: int, width: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) boxes on the latent grid."""
    th, tw = min(tile, height), min(tile, width)
    return [
        (top, left, th, tw)
        for top in tile_starts(height, th, overlap, align)
        for left in tile_starts(width, tw, overlap, align)
    ]


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    x_scale: int = 1,
    y_scale: int = 1,
    align: int = 1,
    batch: int = 1,
    memory_budget: Callable[[], int] | None = None,
) -> torch.Tensor:
    """Apply `fn` tile by tile and blend; a single tile is just `fn(x)`, bit for bit.

    `tile`, `overlap` and `align` are in latent units; `x_scale`/`y_scale` are the number of
    input/output pixels per latent pixel. Up to `batch` tiles (all of one size) go through `fn` at once; with
    `memory_budget` (called for the bytes a batch may take, only when `batch` > 1 and there are several tiles) the
    first tile runs alone and its peak memory caps how many the later batches hold.
    """
    height, width = x.shape[-2] // x_scale, x.shape[-1] // x_scale
    boxes = tile_boxes(height, width, tile, overlap, align)
    if len(boxes) == 1:
        return fn(x)
    n, batch = x.shape[0], max(batch, 1)
    measure = memory_budget is not None and batch > 1
    out = weight_sum = None
    done = 0
    while done < len(boxes):
        chunk = boxes[done : done + (1 if measure else batch)]
        s = x_scale
        crops = [x[..., top * s : (top + th) * s, left * s : (left + tw) * s] for top, left, th, tw in chunk]
        with PeakMemory(x.device) if measure else nullcontext() as memory:
            ys = fn(crops[0] if len(crops) == 1 else torch.cat(crops))
        if measure:
            batch = min(batch, max(1, memory_budget() // max(memory.peak_bytes, 1)))
            measure = False
        for (top, left, th, tw), y in zip(chunk, ys.float().split(n)):
            if out is None:
                out = y.new_zeros(*y.shape[:-2], height * y_scale, width * y_scale)
                weight_sum = y.new_zeros(height * y_scale, width * y_scale)
            w = gaussian_tile_weights(th * y_scale, tw * y_scale).to(y.device, torch.float32)
            s = y_scale
            out[..., top * s : (top + th) * s, left * s : (left + tw) * s] += y * w
            weight_sum[top * s : (top + th) * s, left * s : (left + tw) * s] += w
        done += len(chunk)
    return (out / weight_sum).to(x.dtype)
