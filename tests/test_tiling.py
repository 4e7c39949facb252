import pytest
import torch
import torch.nn.functional as F

from tinysr import tiling
from tinysr.tiling import gaussian_tile_weights, tile_boxes, tile_starts, tiled_map


@pytest.mark.parametrize("length,tile,overlap,align", [(64, 64, 8, 2), (100, 64, 8, 2), (90, 16, 6, 2), (17, 4, 1, 1), (5, 8, 2, 1)])
def test_tiles_cover_every_pixel_and_stay_aligned(length, tile, overlap, align):
    starts = tile_starts(length, tile, overlap, align)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s : s + min(tile, length)] = True
        assert s % align == 0 or s == length - tile
    assert covered.all()
    assert starts[-1] + min(tile, length) == length


def test_normalised_weights_sum_to_one():
    h, w, tile, overlap = 40, 52, 16, 6
    total = torch.zeros(h, w)
    parts = []
    for top, left, th, tw in tile_boxes(h, w, tile, overlap, 2):
        m = torch.zeros(h, w)
        m[top : top + th, left : left + tw] = gaussian_tile_weights(th, tw)
        total += m
        parts.append(m)
    assert (total > 0).all()
    assert torch.allclose(sum(p / total for p in parts), torch.ones(h, w), atol=1e-6)


def test_gaussian_weights_peak_in_the_middle_and_are_symmetric():
    w = gaussian_tile_weights(9, 9)
    assert w[4, 4] == w.max() and w.dtype == torch.float64
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1))
    shifted = gaussian_tile_weights(8, 8, y_midpoint=4.0)  # the release scripts' y midpoint H/2
    assert shifted[4].sum() == shifted.sum(1).max() and not torch.allclose(shifted, shifted.flip(0))


def test_single_tile_is_exactly_the_untiled_call():
    fn = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 24, 40)
    with torch.no_grad():
        assert torch.equal(tiled_map(fn, x, tile=40, overlap=8), fn(x))


def test_pointwise_function_is_reproduced_by_blending():
    x = torch.randn(1, 3, 30, 46)
    out = tiled_map(torch.tanh, x, tile=8, overlap=3)
    assert torch.allclose(out, torch.tanh(x), atol=1e-6)


def test_scaled_grids_for_encoder_and_decoder():
    x = torch.randn(1, 3, 64, 96)
    down = tiled_map(lambda t: F.avg_pool2d(t, 8), x, tile=4, overlap=2, x_scale=8)
    assert torch.allclose(down, F.avg_pool2d(x, 8), atol=1e-6)
    z = torch.randn(1, 16, 10, 14)
    up = tiled_map(lambda t: F.interpolate(t, scale_factor=8, mode="nearest"), z, tile=4, overlap=2, y_scale=8)
    assert up.shape == (1, 16, 80, 112)
    assert torch.allclose(up, F.interpolate(z, scale_factor=8, mode="nearest"), atol=1e-6)


def test_batches_hold_as_many_tiles_as_the_memory_budget_allows(monkeypatch):
    """The arithmetic, with the first tile's peak fixed at 48 MB (PeakMemory's CPU reading is tested in test_speed_paths)."""

    class FirstTilePeak:
        def __init__(self, device):
            self.peak_bytes = 48 * 2**20

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(tiling, "PeakMemory", FirstTilePeak)
    sizes = []

    def fn(t):
        sizes.append(len(t))
        return torch.tanh(t)

    x = torch.randn(1, 3, 22, 30)
    assert len(tile_boxes(22, 30, 8, 3)) == 24
    out = tiled_map(fn, x, tile=8, overlap=3, batch=8, memory_budget=lambda: 170 * 2**20)
    assert sizes == [1] + [3] * 7 + [2]  # the first tile measured alone, then 170 MB hold 3 of 48 MB
    assert torch.allclose(out, torch.tanh(x), atol=1e-6)
    for budget, expected in ((lambda: 2**40, [1, 8, 8, 7]), (lambda: 1, [1] * 24), (None, [8, 8, 8])):
        sizes.clear()
        tiled_map(fn, x, tile=8, overlap=3, batch=8, memory_budget=budget)
        assert sizes == expected
