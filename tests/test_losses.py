"""`without_lattice`: what LPIPS is shown when a stage sets lattice_period (the demo's grid fix)."""

import pytest
import torch

from tinysr.lattice import without_lattice
from trainer.losses import perceptual_loss


def lattice_bins(n: int, period: int) -> torch.Tensor:
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[::n // period, ::n // period] = True
    mask[0, 0] = False
    return mask


@pytest.mark.parametrize("period", [4, 8])
def test_removes_exactly_the_lattice_frequencies(period):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    grid = torch.rand(1, 3, period, period, generator=g).repeat(1, 1, 64 // period, 64 // period)
    before, after = torch.fft.fft2(image + grid), torch.fft.fft2(without_lattice(image + grid, period))
    mask = lattice_bins(64, period)
    assert before[..., mask].abs().max() > 10  # the grid is there to remove
    assert after[..., mask].abs().max() < 1e-3
    keep = ~mask
    assert torch.allclose(after[..., keep], before[..., keep], atol=1e-3)  # every other frequency, the mean included, untouched


def test_sides_that_are_not_multiples_of_the_period_are_refused():
    with pytest.raises(ValueError, match="multiples of 2, got 6x5"):
        without_lattice(torch.zeros(1, 4, 6, 5), 2)


def test_lpips_through_it_sends_no_gradient_to_a_grid():
    """Shown images without their lattice component, ST-LPIPS cannot reward (or draw) a dot grid."""
    lpips = perceptual_loss("stlpips")
    g = torch.Generator().manual_seed(1)
    target = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    pred = (target + 0.2 * torch.randn(1, 3, 64, 64, generator=g)).requires_grad_(True)
    mask = lattice_bins(64, 8)
    lpips(without_lattice(pred, 8), without_lattice(target, 8)).backward()
    blind = torch.fft.fft2(pred.grad)[..., mask].abs().max()
    pred.grad = None
    lpips(pred, target).backward()
    plain = torch.fft.fft2(pred.grad)[..., mask].abs().max()
    assert plain > 1e-4 and blind < 1e-6 * max(plain.item(), 1.0)
