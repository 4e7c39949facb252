"""Colour correction of the SR output against the bicubic-upscaled input (images in [0, 1], NCHW)."""

import torch
import torch.nn.functional as F

COLOR_FIXES = ("adain", "wavelet", "none")


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give each channel of `image` the mean and standard deviation of `reference`."""
    mean_i, std_i = image.mean((-2, -1), keepdim=True), (image.var((-2, -1), keepdim=True) + eps).sqrt()
    mean_r, std_r = reference.mean((-2, -1), keepdim=True), (reference.var((-2, -1), keepdim=True) + eps).sqrt()
    return ((image - mean_i) / std_i * std_r + mean_r).clamp(0, 1)


def wavelet_low_frequency(image: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Repeated dilated 3x3 binomial blur (a trous wavelet): what remains after removing detail."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=image.device) / 16
    c = image.shape[1]
    kernel = kernel.to(image.dtype).expand(c, 1, 3, 3)
    low = image
    for i in range(levels):
        d = 2**i
        padded = F.pad(low, (d, d, d, d), mode="replicate")
        low = F.conv2d(padded, kernel, groups=c, dilation=d)
    return low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Keep the high frequencies of `image` and the low frequencies (colour, shading) of `reference`."""
    return (image - wavelet_low_frequency(image) + wavelet_low_frequency(reference)).clamp(0, 1)


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    if method == "none":
        return image
    raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOR_FIXES)}")
