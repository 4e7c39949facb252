"""`without_lattice` / `lattice_pattern`: what LPIPS is shown when a stage sets lattice_period (the demo's grid fix),
and `cell_step_excess`, the demo teacher fine-tune's guard against blocks."""

import pytest
import torch

from tinysr.lattice import lattice_pattern, without_lattice
from trainer.losses import cell_step_excess, perceptual_loss


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


def test_a_local_window_finds_a_grid_where_it_is():
    """A grid on one half of the image: the whole-image pattern halves it everywhere, a 3-cell window finds it
    at full strength on its side and nothing on the other; a window wider than the image is the whole-image mean."""
    g = torch.Generator().manual_seed(2)
    cell = torch.rand(1, 3, 8, 8, generator=g)
    cell = cell - cell.mean((2, 3), keepdim=True)
    grid = cell.repeat(1, 1, 8, 8)
    grid[..., 32:] = 0  # left half only
    whole, local = lattice_pattern(grid, 8), lattice_pattern(grid, 8, window=3)
    assert torch.allclose(whole[..., :8, :8], cell / 2, atol=1e-6)
    assert torch.allclose(local[..., :8, :8], cell, atol=1e-6)  # 3 cells from the edge: all inside the grid
    assert local[..., 40:].abs().max() < 1e-6
    assert torch.allclose(lattice_pattern(grid, 8, window=15), whole, atol=1e-6)
    assert torch.equal(without_lattice(grid, 8), grid - whole)
    with pytest.raises(ValueError, match="odd number of cells, got 4"):
        lattice_pattern(grid, 8, window=4)


def test_cell_step_excess_counts_block_edges_not_texture_inside_cells():
    """Steps across 4-px cells beyond the target's cost; a smooth image, the target itself, or texture that steps
    inside the cells as much as across them does not hide the blocks."""
    g = torch.Generator().manual_seed(3)
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)  # a smooth target
    blocks = ramp.unflatten(3, (16, 4)).mean(-1, keepdim=True).expand(-1, -1, -1, -1, 4).flatten(3)  # 4-px steps across
    assert cell_step_excess(ramp, ramp, 4) == 0 and cell_step_excess(blocks, blocks, 4) == 0
    excess = cell_step_excess(blocks, ramp, 4)
    assert excess > 0.05
    inside = torch.zeros(1, 3, 64, 64)
    inside[..., 1::4] = 0.05 * torch.rand(1, 3, 64, 16, generator=g)  # texture stepping inside each cell only
    assert cell_step_excess(blocks + inside, ramp, 4) >= excess - 1e-6
    assert cell_step_excess(ramp, blocks, 4) == 0  # softer than the target is not its concern
