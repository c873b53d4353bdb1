"""Per-cell statistics from stage maps against numpy.cov of the upsampled embeddings.

The stage maps are built by hand at their own resolutions; the reference upsamples them with
``numpy.repeat`` (nearest upsampling by an integer factor), concatenates them and takes
``numpy.cov(ddof=1)`` position by position. The data sit near 1e4 so that a formula that cancels
catastrophically could not pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from padim.core.cell_statistics import CellLayout, CellStatistics, hierarchical
from padim.core.config import PadimConfig
from padim.core.fitter import PadimFitter
from padim.core.statistics import GaussianAccumulator

OFFSET = 1.0e4
RTOL = 1e-9
LAYOUT = CellLayout(grid=(8, 4), groups=((3, 1), (2, 2), (4, 4)))  # d = 9, P = 32


def stage_maps(layout: CellLayout, n: int, seed: int) -> list[np.ndarray]:
    """Random stage maps ``(n, c, H / side, W / side)``, correlated within and across groups."""
    rng = np.random.default_rng(seed)
    h, w = layout.grid
    maps = []
    for c, side in layout.groups:
        base = rng.normal(size=(n, 1, h // side, w // side))
        maps.append(OFFSET + rng.normal(size=(n, c, h // side, w // side)) + base * rng.normal(size=(1, c, 1, 1)))
    return maps


def upsampled(layout: CellLayout, maps: list[np.ndarray]) -> np.ndarray:
    """The embedding ``(n, d, H, W)`` the maps stand for (nearest upsampling, concatenation)."""
    sides = [side for _, side in layout.groups]
    parts = [np.repeat(np.repeat(m, side, axis=2), side, axis=3) for m, side in zip(maps, sides, strict=True)]
    return np.concatenate(parts, axis=1)


def reference(embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means ``(P, d)`` and ``numpy.cov`` ``(P, d, d)``."""
    n, d = embedding.shape[:2]
    flat = embedding.reshape(n, d, -1)
    covs = np.stack([np.cov(flat[:, :, p], rowvar=False, ddof=1) for p in range(flat.shape[2])])
    return flat.mean(axis=0).T, covs


def assert_matches(acc: GaussianAccumulator, embedding: np.ndarray) -> None:
    means, covs = reference(embedding)
    assert acc.n == embedding.shape[0]
    assert np.abs(acc.mean.numpy() - means).max() / OFFSET < RTOL
    scale = np.abs(covs).max(axis=(1, 2), keepdims=True)
    assert (np.abs(acc.covariance().numpy() - covs) / scale).max() < RTOL


def feed(cells: CellStatistics, maps: list[np.ndarray], start: int, stop: int, batch: int) -> None:
    for first in range(start, stop, batch):
        last = min(stop, first + batch)
        cells.add([torch.from_numpy(m[first:last]) for m in maps])


def test_hierarchical_order_puts_each_cell_together() -> None:
    grid = torch.arange(16).view(4, 4)
    one_level = hierarchical(grid, 0, (2,))
    assert one_level.shape == (2, 2, 2, 2)
    assert one_level.reshape(-1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    two_levels = hierarchical(grid.view(1, 4, 4, 1), 1, (2, 2))
    assert two_levels.shape == (1, 1, 1, 2, 2, 2, 2, 1)
    assert two_levels.reshape(-1).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert hierarchical(grid, 0, ()) is grid


@pytest.mark.parametrize(("batch", "max_images"), [(7, 4), (7, 1000), (30, 8), (1, 3)])
def test_cell_statistics_equal_numpy(batch: int, max_images: int) -> None:
    maps = stage_maps(LAYOUT, 30, seed=4)
    acc = GaussianAccumulator(32, 9)
    cells = CellStatistics(acc, LAYOUT, max_images=max_images)
    feed(cells, maps, 0, 30, batch)
    assert acc.n == 0 and cells.pending == 30  # held in compact form until flushed
    cells.flush()
    assert cells.pending == 0
    assert_matches(acc, upsampled(LAYOUT, maps))


@pytest.mark.parametrize(
    "layout",
    [
        CellLayout(grid=(8, 8), groups=((2, 2), (3, 4))),  # no per-position group: positions below the finest cell
        CellLayout(grid=(4, 4), groups=((2, 1), (3, 1), (2, 2))),  # two groups of the same side
        CellLayout(grid=(6, 12), groups=((2, 1), (3, 3))),  # a factor of 3
        CellLayout(grid=(8, 8), groups=((2, 1), (1, 2), (2, 8))),  # three levels, factors 2 and 4
    ],
)
def test_other_layouts_equal_numpy(layout: CellLayout) -> None:
    maps = stage_maps(layout, 13, seed=9)
    acc = GaussianAccumulator(layout.grid[0] * layout.grid[1], layout.dim)
    cells = CellStatistics(acc, layout, max_images=5)
    feed(cells, maps, 0, 13, 4)
    cells.flush()
    assert_matches(acc, upsampled(layout, maps))


def test_cell_statistics_continue_existing_statistics() -> None:
    maps = stage_maps(LAYOUT, 25, seed=6)
    embedding = upsampled(LAYOUT, maps)
    acc = GaussianAccumulator(32, 9)
    acc.update(torch.from_numpy(embedding[:10]))  # e.g. a model being refit with new images
    cells = CellStatistics(acc, LAYOUT, max_images=4)
    feed(cells, maps, 10, 18, 5)
    acc.update(torch.from_numpy(embedding[18:21]))  # the statistics may change while images are held
    feed(cells, maps, 21, 25, 3)
    cells.flush()
    assert_matches(acc, embedding[[*range(10), *range(18, 21), *range(10, 18), *range(21, 25)]])
    # A second round starts from the merged statistics.
    more = stage_maps(LAYOUT, 6, seed=7)
    feed(cells, more, 0, 6, 6)
    cells.flush()
    assert_matches(acc, np.concatenate([embedding, upsampled(LAYOUT, more)]))


def test_bad_batches_are_refused_before_anything_is_held() -> None:
    maps = [torch.from_numpy(m) for m in stage_maps(LAYOUT, 4, seed=1)]
    cells = CellStatistics(GaussianAccumulator(32, 9), LAYOUT)
    with pytest.raises(ValueError, match="shapes"):
        cells.add([maps[0], maps[1], maps[2][:, :3]])
    with pytest.raises(ValueError, match="groups"):
        cells.add(maps[:2])
    maps[1][2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cells.add(maps)
    assert cells.pending == 0
    cells.flush()
    assert cells.accumulator.n == 0


def test_layouts_that_cannot_be_used_are_refused() -> None:
    with pytest.raises(ValueError):
        CellLayout(grid=(8, 6), groups=((3, 1), (2, 4)))  # 6 is not a multiple of 4
    with pytest.raises(ValueError):
        CellLayout(grid=(8, 8), groups=((3, 2), (2, 1)))  # sides must not decrease
    with pytest.raises(ValueError):
        CellLayout(grid=(8, 8), groups=((3, 2), (2, 3)))  # 3 is not a multiple of 2
    with pytest.raises(ValueError):
        CellStatistics(GaussianAccumulator(32, 10), LAYOUT)  # d differs


def test_fitter_falls_back_when_stage_maps_do_not_tile_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    config = PadimConfig(backbone="resnet18", weights="random", image_size=32, crop_size=32, channels=20)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fitter = PadimFitter(config)
    assert fitter.uses_cells
    fitter.update(images[:2])
    # Images of another size are refused, and the per-cell statistics stay in use.
    with pytest.raises(ValueError, match="expected"):
        fitter.update(torch.randn(2, 3, 48, 48))
    assert fitter.uses_cells
    # A backbone whose coarser maps are not exactly the grid over the cell side (odd padding, say).
    real = CellStatistics.expected_shapes

    def misaligned(self: CellStatistics, batch: int) -> list[tuple[int, int, int, int]]:
        first, *rest = real(self, batch)
        return [first, *[(batch, c, h + 1, w) for batch, c, h, w in rest]]

    monkeypatch.setattr(CellStatistics, "expected_shapes", misaligned)
    fitter.update(images[2:])  # goes to the plain path; both parts end up in the statistics
    plain = GaussianAccumulator(fitter.accumulator.num_positions, fitter.accumulator.dim)
    plain.update(fitter.embed(images))
    acc = fitter.accumulator
    assert acc.n == 5
    torch.testing.assert_close(acc.mean, plain.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.m2, plain.m2, rtol=0, atol=1e-12 * float(plain.m2.abs().max()))
