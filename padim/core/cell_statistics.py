"""PaDiM's Gaussian statistics computed from the tapped stages, without upsampling them.

PaDiM's embedding brings the stride-8 and stride-16 maps to the stride-4 grid by nearest
upsampling, so their channels repeat over 2 x 2 and 4 x 4 cells of the patch grid. Every product
in a position's co-moment therefore involves at most one distinct value per cell of the coarser of
its two channels: :class:`CellStatistics` takes the (selected) stage maps as they come out of the
network and computes each product once per cell of the coarser channel, as one batched matrix
product per pair of channel groups. At d = 100 of EfficientNet-Lite0 (12, 28 and 60 channels
from strides 4, 8 and 16) that is a fifth of the arithmetic of the full ``(P, d, d)`` update, and
the ``(B, P, d)`` embedding, its float64 copy and its transposition are never made. The result
is added to a :class:`padim.core.statistics.GaussianAccumulator` when the statistics are read, and
equals :meth:`GaussianAccumulator.update` over the upsampled embeddings (the same products,
summed in another order).

Cells are stored in hierarchical order: the coarsest cells row-major, and inside each of them
the sub-cells of every finer level, coarse to fine. In that order the cells of one group that
fall inside one cell of a coarser group are contiguous, so each pair's product is a plain
``torch.baddbmm`` over contiguous blocks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from padim.core.statistics import GaussianAccumulator, _check_finite, _position_chunk

DEFAULT_BUDGET_BYTES = 96 << 20
"""Float64 stage vectors held before one fold (about 128 images at d = 100)."""

MAX_HELD_IMAGES = 128


@dataclass(frozen=True)
class CellLayout:
    """Which channels of the embedding are constant over square cells of the patch grid.

    Args:
        grid: ``(H, W)`` of the patch grid (``P = H * W``, row-major).
        groups: ``(channels, cell side)`` per consecutive channel group, in channel order; cell
            sides non-decreasing, each a multiple of the previous, dividing ``H`` and ``W``.
    """

    grid: tuple[int, int]
    groups: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        h, w = self.grid
        sides = [side for _, side in self.groups]
        if not self.groups or any(c < 1 or side < 1 for c, side in self.groups):
            raise ValueError(f"groups must be non-empty (channels, side) pairs >= 1, got {self.groups}")
        if sides != sorted(sides) or any(b % a for a, b in itertools.pairwise(sides)):
            raise ValueError(f"cell sides must be non-decreasing multiples of each other, got {sides}")
        if h % sides[-1] or w % sides[-1]:
            raise ValueError(f"grid {self.grid} is not divisible by the cell side {sides[-1]}")

    @property
    def dim(self) -> int:
        """Total channels ``d``."""
        return sum(c for c, _ in self.groups)

    @property
    def top(self) -> tuple[int, int]:
        """Rows and columns of the coarsest cells."""
        side = self.groups[-1][1]
        return self.grid[0] // side, self.grid[1] // side

    def factors(self, side: int) -> tuple[int, ...]:
        """Subdivision factors from the coarsest cells down to cells of ``side``, coarse first.

        Example: sides 1, 2, 4 give ``(2, 2)`` for side 1, ``(2,)`` for 2 and ``()`` for 4.
        """
        levels = sorted({1, *(s for _, s in self.groups)}, reverse=True)
        below = [s for s in levels if s >= side]
        return tuple(a // b for a, b in itertools.pairwise(below))

    def cells(self, side: int) -> int:
        """Number of cells of ``side`` in the grid."""
        return (self.grid[0] // side) * (self.grid[1] // side)

    def offsets(self) -> list[int]:
        """First embedding channel of each group."""
        return [0, *itertools.accumulate(c for c, _ in self.groups)][:-1]


def hierarchical(tensor: torch.Tensor, dim: int, factors: tuple[int, ...]) -> torch.Tensor:
    """View the two grid dimensions ``dim, dim + 1`` of ``tensor`` in hierarchical cell order.

    Args:
        tensor: Any tensor whose dimensions ``dim`` and ``dim + 1`` are the rows and columns of a
            grid that ``prod(factors)`` divides.
        dim: Position of the row dimension.
        factors: Subdivision factors, coarse first (:meth:`CellLayout.factors`).

    Returns:
        A view with the two grid dimensions replaced by ``(rows, cols, f1, f1, ..., fk, fk)``:
        the coarsest cells, then the row and column digit of every finer level.
    """
    k = len(factors)
    if not k:
        return tensor
    scale = math.prod(factors)
    rows, cols = tensor.shape[dim] // scale, tensor.shape[dim + 1] // scale
    split = tensor.unflatten(dim + 1, (cols, *factors)).unflatten(dim, (rows, *factors))
    # split: ..., rows, fy_1..fy_k, cols, fx_1..fx_k, ...
    before = list(range(dim))
    digits = [d for i in range(k) for d in (dim + 1 + i, dim + k + 2 + i)]
    after = list(range(dim + 2 * k + 2, split.ndim))
    return split.permute(*before, dim, dim + k + 1, *digits, *after)


class CellStatistics:
    """Shifted sums of PaDiM embeddings, kept per cell of each channel group.

    Feed it the stage maps with the embedding's channels selected (:meth:`add`, one tensor per
    group); it holds up to ``capacity`` images as float64 vectors per cell, then folds them into
    per-pair co-moment blocks with one batched product per pair of groups. :meth:`flush` adds
    everything to the accumulator (every position of every cell, and the mirrored blocks).

    Args:
        accumulator: Where the statistics end up (it may hold statistics already, and may change
            between flushes).
        layout: The embedding's groups and cell sides.
        budget_bytes: Most bytes of float64 vectors held before a fold.
        max_images: Upper bound on the images held before a fold.
    """

    def __init__(
        self,
        accumulator: GaussianAccumulator,
        layout: CellLayout,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        max_images: int = MAX_HELD_IMAGES,
    ) -> None:
        h, w = layout.grid
        if h * w != accumulator.num_positions or layout.dim != accumulator.dim:
            raise ValueError(
                f"the layout describes P={h * w}, d={layout.dim}; the statistics have "
                f"P={accumulator.num_positions}, d={accumulator.dim}"
            )
        self.accumulator = accumulator
        self.layout = layout
        per_image = 8 * sum(layout.cells(side) * c for c, side in layout.groups)
        self.capacity = max(1, min(max_images, budget_bytes // per_image))
        self.n = 0  # images in the sums (held ones included)
        self._held = 0
        self._vectors: list[torch.Tensor] = []  # per group (cells, c, capacity), shifted, float64
        self._shift: list[torch.Tensor] = []  # per group (cells, c)
        self._sum: list[torch.Tensor] = []  # per group (cells, c)
        self._blocks: dict[tuple[int, int], torch.Tensor] = {}  # (g, h) -> (cells_h, n_sub * c_g, c_h)

    @property
    def pending(self) -> int:
        """Images seen and not yet added to the accumulator."""
        return self.n

    def expected_shapes(self, batch: int) -> list[tuple[int, int, int, int]]:
        """Shape ``(B, c, H / side, W / side)`` of each group's input for a batch of ``batch``."""
        h, w = self.layout.grid
        return [(batch, c, h // side, w // side) for c, side in self.layout.groups]

    def add(self, groups: list[torch.Tensor]) -> None:
        """Take a batch of stage maps.

        Args:
            groups: One tensor per group, shapes ``(B, c_g, H / side_g, W / side_g)`` (any memory
                format, any float dtype), in channel order.

        Raises:
            ValueError: If the shapes do not match the layout or a value is not finite.
        """
        if len(groups) != len(self.layout.groups):
            raise ValueError(f"expected {len(self.layout.groups)} channel groups, got {len(groups)}")
        b = groups[0].shape[0]
        shapes = self.expected_shapes(b)
        for group, shape in zip(groups, shapes, strict=True):
            if tuple(group.shape) != shape:
                raise ValueError(f"expected stage maps of shapes {shapes}, got {[tuple(g.shape) for g in groups]}")
        if b == 0:
            return
        for group in groups:
            _check_finite(group)  # before anything is held
        device = self.accumulator.device
        sources = [self._source(g.to(device), side) for g, (_, side) in zip(groups, self.layout.groups, strict=True)]
        if self.n == 0:
            self._start(sources)
        start = 0
        while start < b:
            take = min(b - start, self.capacity - self._held)
            for index, source in enumerate(sources):
                target = self._view(self._vectors[index][..., self._held : self._held + take], index)
                shift = self._view(self._shift[index], index).unsqueeze(-1)
                torch.sub(source[..., start : start + take], shift, out=target)  # promote, shift: one pass
            self._held += take
            self.n += take
            start += take
            if self._held == self.capacity:
                self._fold()

    def flush(self) -> None:
        """Add every image seen to the accumulator, and start afresh (a no-op when none is held)."""
        if self.n == 0:
            return
        self._fold()
        self._expand_into()
        self.n = 0
        self._vectors, self._shift, self._sum, self._blocks = [], [], [], {}

    def _source(self, group: torch.Tensor, side: int) -> torch.Tensor:
        """``(B, c, h, w)`` -> a ``(rows, cols, digits..., c, B)`` view in hierarchical order."""
        rows = group.permute(0, 2, 3, 1)  # (B, h, w, c)
        return hierarchical(rows, 1, self.layout.factors(side)).movedim(0, -1)

    def _view(self, cells: torch.Tensor, index: int) -> torch.Tensor:
        """A group's ``(cells, c, ...)`` tensor as ``(rows, cols, digits..., c, ...)``."""
        factors = self.layout.factors(self.layout.groups[index][1])
        return cells.unflatten(0, (*self.layout.top, *(f for f in factors for _ in (0, 1))))

    def _start(self, sources: list[torch.Tensor]) -> None:
        """Fix the shift (the first batch's mean) and allocate the sums and blocks."""
        device = self.accumulator.device
        layout = self.layout
        self._shift, self._sum, self._vectors = [], [], []
        for (c, side), source in zip(layout.groups, sources, strict=True):
            cells = layout.cells(side)
            self._shift.append(source.mean(dim=-1, dtype=torch.float64).reshape(cells, c))
            self._sum.append(torch.zeros(cells, c, dtype=torch.float64, device=device))
            self._vectors.append(torch.empty(cells, c, self.capacity, dtype=torch.float64, device=device))
        self._blocks = {}
        for (g, (c_g, _)), (h, (c_h, side_h)) in itertools.combinations_with_replacement(enumerate(layout.groups), 2):
            cells_h = layout.cells(side_h)
            rows = layout.cells(layout.groups[g][1]) // cells_h * c_g
            self._blocks[g, h] = torch.zeros(cells_h, rows, c_h, dtype=torch.float64, device=device)
        self._held = 0

    def _fold(self) -> None:
        """Multiply the held vectors into the per-pair blocks and the sums."""
        n = self._held
        if n == 0:
            return
        for index, vectors in enumerate(self._vectors):
            self._sum[index].add_(vectors[..., :n].sum(dim=-1))
        for (g, h), block in self._blocks.items():
            left = self._vectors[g].view(block.shape[0], block.shape[1], self.capacity)[..., :n]
            right = self._vectors[h][..., :n]
            block.baddbmm_(left, right.transpose(1, 2))
        self._held = 0

    def _expand_into(self) -> None:
        """Add the sums and blocks to every position of their cells in the accumulator."""
        acc = self.accumulator
        layout = self.layout
        h, w = layout.grid
        d = acc.dim
        fine = layout.factors(1)
        pairs = len(fine)
        shift = torch.empty(h * w, d, dtype=torch.float64, device=acc.device)
        total = torch.empty_like(shift)
        shift_view = hierarchical(shift.view(h, w, d), 0, fine)
        total_view = hierarchical(total.view(h, w, d), 0, fine)
        offsets = layout.offsets()
        for index, ((c, side), start) in enumerate(zip(layout.groups, offsets, strict=True)):
            extra = pairs - len(layout.factors(side))
            spread = (*([1] * 2 * extra), c)
            shift_view[..., start : start + c].copy_(self._view(self._shift[index], index).unflatten(-1, spread))
            total_view[..., start : start + c].copy_(self._view(self._sum[index], index).unflatten(-1, spread))
        if acc.n == 0:
            acc._shift.copy_(shift)
            delta = None
        else:
            delta = shift - acc._shift  # the two shifts differ: correct the held sums to acc's
        target = hierarchical(acc._comoment.view(h, w, d, d), 0, fine)
        for (g, hh), block in self._blocks.items():
            c_g, side_g = layout.groups[g]
            c_h = layout.groups[hh][0]
            extra = pairs - len(layout.factors(side_g))
            values = self._view(block.view(-1, c_g, c_h), g).unflatten(-2, (*([1] * 2 * extra), c_g))
            rows = slice(offsets[g], offsets[g] + c_g)
            cols = slice(offsets[hh], offsets[hh] + c_h)
            target[..., rows, cols].add_(values)
            if g != hh:
                target[..., cols, rows].add_(values.transpose(-1, -2))
        if delta is not None:
            # sum (x - s)(x - s)^T = C + S delta^T + delta S^T + n delta delta^T, with x - t summed in S, C.
            half = total + delta * (self.n / 2.0)
            chunk = _position_chunk(acc.num_positions, d, 1)
            for start in range(0, acc.num_positions, chunk):
                stop = start + chunk
                u, v = half[start:stop].unsqueeze(2), delta[start:stop].unsqueeze(2)
                acc._comoment[start:stop].baddbmm_(u, v.transpose(1, 2)).baddbmm_(v, u.transpose(1, 2))
            total.add_(delta, alpha=float(self.n))
        acc._sum.add_(total)
        acc.n += self.n
        acc._canonical = False
