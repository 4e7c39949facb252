"""A tensor less its mean periodic pattern: how the pipelines and the trainer take a token grid out."""

import torch


def without_lattice(x: torch.Tensor, period: int) -> torch.Tensor:
    """`x` less its mean `period`-periodic pattern: exactly its energy at the multiples of that frequency.

    A one-step transformer's errors carry a per-image offset for each position inside its token (a dot grid
    at the token period once decoded); on its prediction with period = patch size this takes that out and
    leaves every other frequency, the mean included. A perceptual network reads such a grid as texture and
    rewards it; shown images without it, its gradient has nothing at those frequencies, so it cannot draw a
    grid that repeats across the crop (one that changes from token to token it still could).
    """
    n, c, h, w = x.shape
    if h % period or w % period:
        raise ValueError(f"without_lattice needs sides that are multiples of {period}, got {h}x{w}")
    blocks = x.unflatten(2, (h // period, period)).unflatten(4, (w // period, period))
    pattern = blocks.mean((2, 4), keepdim=True)
    return (blocks - (pattern - pattern.mean((3, 5), keepdim=True))).reshape(n, c, h, w)
