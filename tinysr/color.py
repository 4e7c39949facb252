"""Colour correction of the SR output against a reference (images in [0, 1], NCHW).

The arithmetic is the release scripts' (`utils/wavelet_color_fix.py`, after StableSR), operation
for operation, so the official recipe reproduces their output; our default recipe passes the
bicubic-upscaled input as the reference where the scripts pass the LR itself to AdaIN.
"""

import torch
import torch.nn.functional as F

COLOR_FIXES = ("adain", "wavelet", "none")


def channel_mean_std(image: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = image.shape[:2]
    flat = image.reshape(b, c, -1)
    return flat.mean(dim=2).reshape(b, c, 1, 1), (flat.var(dim=2) + eps).sqrt().reshape(b, c, 1, 1)


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Give each channel of `image` the mean and standard deviation of `reference` (any size)."""
    mean_i, std_i = channel_mean_std(image)
    mean_r, std_r = channel_mean_std(reference)
    return ((image - mean_i) / std_i * std_r + mean_r).clamp(0, 1)


def wavelet_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """One a-trous level: the 3x3 binomial kernel, dilated, with replicated borders."""
    kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]], dtype=image.dtype, device=image.device)
    c = image.shape[1]
    padded = F.pad(image, (dilation,) * 4, mode="replicate")
    return F.conv2d(padded, kernel[None, None].repeat(c, 1, 1, 1), groups=c, dilation=dilation)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the detail bands, what remains after removing them)."""
    high = torch.zeros_like(image)
    for i in range(levels):
        low = wavelet_blur(image, 2**i)
        high += image - low
        image = low
    return high, low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Keep the high frequencies of `image` and the low frequencies (colour, shading) of `reference`."""
    return (wavelet_decomposition(image)[0] + wavelet_decomposition(reference)[1]).clamp(0, 1)


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    if method == "none":
        return image
    raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOR_FIXES)}")
