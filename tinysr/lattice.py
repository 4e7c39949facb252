"""A tensor's periodic pattern, whole-image or local: how the pipelines and the trainer take a token grid out."""

import torch
import torch.nn.functional as F


def lattice_pattern(x: torch.Tensor, period: int, window: int = 0) -> torch.Tensor:
    """`x`'s mean `period`-periodic pattern (zero mean over each cell), tiled back to `x`'s size.

    `window` 0 averages every period x period cell of the image: exactly its energy at the multiples of that
    frequency. An odd `window` averages only the window x window cells around each cell, so a grid whose
    strength changes across the image (a decoder drawing latent errors cell by cell) is caught where it is.
    """
    n, c, h, w = x.shape
    if h % period or w % period:
        raise ValueError(f"lattice_pattern needs sides that are multiples of {period}, got {h}x{w}")
    if window < 0 or (window and window % 2 == 0):
        raise ValueError(f"lattice_pattern needs window 0 (whole image) or an odd number of cells, got {window}")
    cells = x.unflatten(2, (h // period, period)).unflatten(4, (w // period, period))
    if not window:
        pattern = cells.mean((2, 4), keepdim=True)
        return (pattern - pattern.mean((3, 5), keepdim=True)).expand_as(cells).reshape(n, c, h, w)
    # one channel per position inside the cell, pooled over neighbouring cells
    by_position = cells.permute(0, 1, 3, 5, 2, 4).reshape(n, c * period * period, h // period, w // period)
    pattern = F.avg_pool2d(by_position, window, 1, window // 2, count_include_pad=False)
    pattern = pattern.reshape(n, c, period, period, h // period, w // period)
    pattern = pattern - pattern.mean((2, 3), keepdim=True)
    return pattern.permute(0, 1, 4, 2, 5, 3).reshape(n, c, h, w)


def without_lattice(x: torch.Tensor, period: int) -> torch.Tensor:
    """`x` less its mean `period`-periodic pattern: exactly its energy at the multiples of that frequency.

    A one-step transformer's errors carry a per-image offset for each position inside its token (a dot grid
    at the token period once decoded); on its prediction with period = patch size this takes that out and
    leaves every other frequency, the mean included. A perceptual network reads such a grid as texture and
    rewards it; shown images without it, its gradient has nothing at those frequencies, so it cannot draw a
    grid that repeats across the crop (one that changes from token to token it still could: `lattice_pattern`
    with a window).
    """
    return x - lattice_pattern(x, period)
