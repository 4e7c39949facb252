import pytest
import torch

from tinysr.color import adain_color_fix, apply_color_fix, wavelet_color_fix, wavelet_decomposition

from .conftest import random_image


def test_adain_transfers_channel_statistics():
    image = random_image(64, 64, seed=1) * 0.5 + 0.25
    reference = random_image(64, 64, seed=2) * 0.3 + 0.35
    out = adain_color_fix(image[None], reference[None])[0]
    assert torch.allclose(out.mean((1, 2)), reference.mean((1, 2)), atol=1e-4)
    assert torch.allclose(out.std((1, 2)), reference.std((1, 2)), atol=1e-3)


def test_wavelet_fix_keeps_detail_and_takes_reference_colour():
    image = random_image(48, 64, seed=3) * 0.6 + 0.2
    assert torch.allclose(wavelet_color_fix(image[None], image[None]), image[None], atol=1e-6)
    shifted = (image + 0.1).clamp(0, 1)
    assert torch.allclose(wavelet_color_fix(image[None], image[None] + 0.1), shifted[None], atol=1e-5)
    flat = torch.full((1, 1, 32, 32), 0.3)
    high, low = wavelet_decomposition(flat)
    assert torch.allclose(low, flat) and high.abs().max() < 1e-6


def test_none_and_unknown():
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(apply_color_fix(x, torch.rand(1, 3, 8, 8), "none"), x)
    with pytest.raises(ValueError, match="colour fix"):
        apply_color_fix(x, x, "sepia")
