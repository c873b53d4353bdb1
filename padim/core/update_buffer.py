"""Fold the embeddings of several batches into a Gaussian accumulator at once.

An update reads and writes the whole ``(P, d, d)`` float64 co-moment, so folding ~128 images per
update instead of one batch of 32 keeps that memory traffic from costing as much as the arithmetic.
"""

from __future__ import annotations

import torch

from padim.core.statistics import GaussianAccumulator, patch_rows

DEFAULT_BUFFER_BYTES = 160 << 20
"""Embeddings :class:`UpdateBuffer` collects before one update (about 128 images at d = 100)."""


MAX_BUFFERED_IMAGES = 256


class UpdateBuffer:
    """Collect the embeddings of several batches and fold them into an accumulator at once.

    An update reads and writes the whole ``(P, d, d)`` float64 co-moment (251 MB at d = 100)
    around a product whose inner dimension is the number of images, so with batches of 32 that
    memory traffic costs as much as the arithmetic; folding ~128 images per update makes it a
    compute-bound product. The statistics are the same (exact for any batch split). (On a CPU the
    fitter usually takes :class:`padim.core.cell_statistics.CellStatistics` instead.)

    Args:
        accumulator: Where the embeddings go.
        budget_bytes: Most bytes of embeddings held (in their own dtype); a buffer smaller than an
            incoming batch is skipped (the batch is folded in directly).
        max_images: Upper bound on the images held.
    """

    def __init__(
        self,
        accumulator: GaussianAccumulator,
        budget_bytes: int = DEFAULT_BUFFER_BYTES,
        max_images: int = MAX_BUFFERED_IMAGES,
    ) -> None:
        if budget_bytes < 0 or max_images < 0:
            raise ValueError(f"budget_bytes and max_images must be >= 0, got {budget_bytes}, {max_images}")
        self.accumulator = accumulator
        self.budget_bytes = budget_bytes
        self.max_images = max_images
        self._buffer: torch.Tensor | None = None  # (capacity, P, d)
        self._count = 0

    @property
    def pending(self) -> int:
        """Images held and not yet in the accumulator."""
        return self._count

    def add(self, embeddings: torch.Tensor) -> None:
        """Hold a batch, folding everything in whenever the buffer fills.

        Args:
            embeddings: Shape ``(B, d, H, W)`` with ``H * W = P``, or ``(B, d, P)``.

        Raises:
            ValueError: If the shape does not match the accumulator's ``d`` and ``P``.
        """
        rows = patch_rows(self.accumulator._check_shape(embeddings))  # (B, P, d)
        capacity = self._capacity(rows)
        if capacity <= rows.shape[0]:
            self._drain()
            self._fold(rows)
            return
        if self._buffer is None or self._buffer.dtype != rows.dtype or self._buffer.device != rows.device:
            self._drain()
            self._buffer = torch.empty((capacity, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        start = 0
        while start < rows.shape[0]:
            take = min(rows.shape[0] - start, self._buffer.shape[0] - self._count)
            self._buffer[self._count : self._count + take].copy_(rows[start : start + take])
            self._count += take
            start += take
            if self._count == self._buffer.shape[0]:
                self._drain()

    def flush(self) -> None:
        """Fold every held image into the accumulator (a no-op when none is held)."""
        self._drain()

    def _drain(self) -> None:
        """Fold the buffered images into the accumulator."""
        if self._count and self._buffer is not None:
            self._fold(self._buffer[: self._count])
        self._count = 0

    def _fold(self, rows: torch.Tensor) -> None:
        self.accumulator.update(rows.transpose(1, 2))  # (n, d, P) view

    def release(self) -> None:
        """Flush, then free the buffer's memory."""
        self.flush()
        self._buffer = None

    def _capacity(self, rows: torch.Tensor) -> int:
        per_image = rows.shape[1] * rows.shape[2] * rows.element_size()
        return min(self.max_images, self.budget_bytes // max(per_image, 1))
