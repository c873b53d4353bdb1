"""Exact streaming Gaussian statistics per patch position.

For each of ``P`` patch positions the accumulator keeps the count ``n`` (the same for every
position: each image contributes one vector to each), the mean ``(P, d)`` and the centred
co-moment ``M2 = sum_k (x_k - mean)(x_k - mean)^T`` of shape ``(P, d, d)``, in float64. A batch
is folded in with the pairwise update of Chan, Golub and LeVeque (1979)::

    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    M2    = M2_a + M2_b + delta delta^T * n_a n_b / n

which is also how two accumulators (shards fitted on different machines, or an old model and new
images) merge. The result is independent of the batch split, the shard split and the merge order
up to float64 rounding, and equals ``numpy.cov(ddof=1)`` over all the data. The same update solved
for one part removes images again (:meth:`GaussianAccumulator.subtract`). Memory is
``O(P d^2)``, independent of the number of images. Every operation is batched over positions
(``torch.baddbmm``); nothing loops over positions in Python. Long operations are chunked over
positions to bound temporary memory for large ``d`` (WideResNet50, ``d = 550``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from padim.core.covariance import oas_shrink, pack_lower, unpack_lower
from padim.errors import PadimError

STATE_FORMAT = "padim.gaussian-accumulator/1"


_NEGATIVE_VARIANCE_TOLERANCE = 1e-6
"""How far below zero (relative to the largest variance of its position before)
:meth:`GaussianAccumulator.subtract` lets a remaining variance fall before it refuses: float64
rounding stays far below it."""


def patch_rows(embeddings: torch.Tensor) -> torch.Tensor:
    """Embeddings as one row per image and patch position: ``(B, P, d)``.

    A view (no copy) for channels-last ``(B, d, H, W)`` embeddings, as
    :class:`padim.core.embedding.EmbeddingProjector` produces them; other layouts are copied.

    Args:
        embeddings: Shape ``(B, d, H, W)`` or ``(B, d, P)``.

    Returns:
        Shape ``(B, P, d)``.
    """
    if embeddings.ndim == 4:
        b, d, h, w = embeddings.shape
        return embeddings.permute(0, 2, 3, 1).reshape(b, h * w, d)
    return embeddings.transpose(1, 2)


def _position_chunk(num_positions: int, dim: int, batch: int, budget_bytes: int = 16 << 20) -> int:
    """Number of positions processed at once so that float64 temporaries stay within ``budget_bytes``."""
    per_position = 8 * dim * max(batch, 1)
    return max(1, min(num_positions, budget_bytes // max(per_position, 1)))


def _check_finite(rows: torch.Tensor) -> None:
    """Refuse a batch with a NaN or an infinity (one cheap reduction for the usual finite batch).

    A non-finite value anywhere makes the sum non-finite; an overflowing sum of finite values is
    re-checked element by element.
    """
    if not bool(torch.isfinite(rows.sum())) and not bool(torch.isfinite(rows).all()):
        raise ValueError("embeddings contain NaN or infinite values")


def _fill_mean(out: torch.Tensor, rows: torch.Tensor, chunk: int) -> None:
    """``out`` ``(P, d)`` = the float64 mean of ``rows`` ``(B, P, d)``, a block of positions at a time."""
    for start in range(0, rows.shape[1], chunk):
        out[start : start + chunk] = rows[:, start : start + chunk].mean(dim=0, dtype=torch.float64)


def _scratch(owner: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float64 work array of ``shape`` kept on ``owner`` between calls.

    Allocating the conversion block afresh for every chunk costs more than the arithmetic: an
    allocation of this size is mapped from the OS and page-faulted in on first write each time.
    """
    size = math.prod(shape)
    cached = getattr(owner, "_scratch_buffer", None)
    if cached is None or cached.numel() < size or cached.device != device:
        cached = torch.empty(size, dtype=torch.float64, device=device)
        owner._scratch_buffer = cached  # type: ignore[attr-defined]
    return cached[:size].view(shape)


@dataclass(frozen=True)
class GaussianEstimate:
    """Finalised per-position Gaussians.

    Attributes:
        mean: Means, shape ``(P, d)``, float64.
        covariance: Regularised covariances, shape ``(P, d, d)``, float64.
        n: Number of vectors per position.
    """

    mean: torch.Tensor
    covariance: torch.Tensor
    n: int


class GaussianAccumulator:
    """Streaming mean and covariance of ``d``-dim vectors at each of ``P`` positions.

    Args:
        num_positions: Number of patch positions ``P``.
        dim: Embedding dimension ``d``.
        device: Device of the state tensors (statistics stay float64 there).

    Example:
        >>> acc = GaussianAccumulator(num_positions=4, dim=3)
        >>> acc.update(torch.randn(10, 3, 2, 2))
        >>> acc.n
        10
    """

    def __init__(self, num_positions: int, dim: int, device: str | torch.device = "cpu") -> None:
        if num_positions < 1 or dim < 1:
            raise ValueError(f"need at least one position and one dimension, got P={num_positions}, d={dim}")
        self.num_positions = num_positions
        self.dim = dim
        self.n = 0
        self._shift = torch.zeros(num_positions, dim, dtype=torch.float64, device=device)
        self._sum = torch.zeros(num_positions, dim, dtype=torch.float64, device=device)
        self._comoment = torch.zeros(num_positions, dim, dim, dtype=torch.float64, device=device)
        self._canonical = True

    @property
    def device(self) -> torch.device:
        """Device of the state tensors."""
        return self._shift.device

    @property
    def mean(self) -> torch.Tensor:
        """Per-position means, shape ``(P, d)``, float64."""
        if self._canonical or self.n == 0:
            return self._shift
        return torch.add(self._shift, self._sum, alpha=1.0 / self.n)  # bit-identical to _canonicalize

    @property
    def m2(self) -> torch.Tensor:
        """Per-position centred co-moments ``sum_k (x_k - mean)(x_k - mean)^T``, shape ``(P, d, d)``."""
        self._canonicalize()
        return self._comoment

    def _canonicalize(self) -> None:
        """Turn the shifted sums into (mean, M2): ``M2 = S - s s^T / n``, chunked over positions.

        Between two canonicalisations every update centres on a fixed shift (the mean at the
        last canonicalisation, or the first batch's mean), so a batch costs one matrix product per
        position block and no rank-one correction of the whole ``(P, d, d)`` state.
        """
        if self._canonical:
            return
        if self.n:
            chunk = _position_chunk(self.num_positions, self.dim, 1)
            for start in range(0, self.num_positions, chunk):
                s = self._sum[start : start + chunk]
                self._comoment[start : start + chunk].baddbmm_(s.unsqueeze(2), s.unsqueeze(1), alpha=-1.0 / self.n)
            self._shift.add_(self._sum, alpha=1.0 / self.n)
        self._sum.zero_()
        self._canonical = True

    def update(self, embeddings: torch.Tensor) -> None:
        """Fold a batch of embeddings into the statistics.

        Args:
            embeddings: Shape ``(B, d, H, W)`` with ``H * W = P``, or ``(B, d, P)``; any float dtype
                (promoted to float64 before any arithmetic).

        Raises:
            ValueError: If the shape does not match ``d`` and ``P``, or values are not finite.
        """
        rows = patch_rows(self._check_shape(embeddings)).to(self.device)  # (B, P, d), caller's dtype
        b = rows.shape[0]
        if b == 0:
            return
        _check_finite(rows)  # before the state changes
        # Convert, centre and fold in one block of positions at a time: the float64 copy of the
        # batch never exists, which keeps the fit's peak memory flat and small. Vectors are
        # centred on a fixed shift (the first batch's mean), the shifted-data form of the
        # update: numerically as good as the pairwise update when the shift is near the mean, and
        # it needs no per-batch correction of the whole state (see :meth:`_canonicalize`).
        chunk = _position_chunk(self.num_positions, self.dim, b)
        if self.n == 0:
            _fill_mean(self._shift, rows, chunk)
        for start in range(0, self.num_positions, chunk):
            stop = start + chunk
            source = rows[:, start:stop].permute(1, 2, 0)  # (c, d, B) view of the caller's tensor
            block = _scratch(self, tuple(source.shape), self.device)
            torch.sub(source, self._shift[start:stop].unsqueeze(2), out=block)  # promote, shift: one pass
            self._sum[start:stop].add_(block.sum(dim=2))
            self._comoment[start:stop].baddbmm_(block, block.transpose(1, 2))
        self.n += b
        self._canonical = False

    def merge(self, other: GaussianAccumulator) -> GaussianAccumulator:
        """Fold another accumulator (same ``P`` and ``d``) into this one, in place.

        Args:
            other: Statistics of a disjoint set of images.

        Returns:
            ``self``, now holding the statistics of both sets.

        Raises:
            ValueError: If the shapes differ.
        """
        if (other.num_positions, other.dim) != (self.num_positions, self.dim):
            raise ValueError(
                f"cannot merge statistics of shape P={other.num_positions}, d={other.dim} "
                f"into P={self.num_positions}, d={self.dim}"
            )
        if other.n == 0:
            return self
        self._canonicalize()
        other_mean = other.mean.to(self.device)
        other_m2 = other.m2.to(self.device)
        n_a, n_b = self.n, other.n
        n = n_a + n_b
        delta = other_mean - self._shift
        chunk = _position_chunk(self.num_positions, self.dim, 1)
        for start in range(0, self.num_positions, chunk):
            stop = start + chunk
            self._comoment[start:stop].add_(other_m2[start:stop])
            if n_a:
                d = delta[start:stop]
                self._comoment[start:stop].baddbmm_(d.unsqueeze(2), d.unsqueeze(1), alpha=n_a * n_b / n)
        self._shift.add_(delta, alpha=n_b / n)
        self.n = n
        return self

    def subtract(self, other: GaussianAccumulator) -> GaussianAccumulator:
        """Remove the statistics of some of the images, in place: the exact inverse of :meth:`merge`.

        ``self`` holds the ``n`` images of ``A + B``, ``other`` the ``n_B`` images of ``B``. Chan's
        update solved for ``A`` (``n_A = n - n_B``; ``e = mean_B - mean`` against the mean of all
        ``n``, which is ``delta n_A / n`` for merge's ``delta = mean_B - mean_A``)::

            mean_A = mean - e * n_B / n_A
            M2_A   = M2 - M2_B - e e^T * n n_B / n_A

        equal to ``numpy.cov(ddof=1)`` of the ``A`` images alone up to float64 rounding (and to
        the rounding of ``B``'s embeddings, when they were computed again). Batched over
        positions like :meth:`merge`.

        Args:
            other: Statistics of images that are part of this accumulator's (e.g. the same images
                embedded again with the same configuration and projector).

        Returns:
            ``self``, now holding the statistics of the images not in ``other`` only.

        Raises:
            ValueError: If the shapes differ, fewer than two images would remain, or a variance
                would become negative beyond rounding (``other`` holds images that are not in
                these statistics); ``self`` is then unchanged.
        """
        if (other.num_positions, other.dim) != (self.num_positions, self.dim):
            raise ValueError(
                f"cannot subtract statistics of shape P={other.num_positions}, d={other.dim} "
                f"from P={self.num_positions}, d={self.dim}"
            )
        if other.n == 0:
            return self
        n, n_b = self.n, other.n
        n_a = n - n_b
        if n_a < 2:
            raise ValueError(
                f"cannot remove {n_b} images from statistics of {n}: fewer than 2 would remain "
                "(a covariance needs at least 2)"
            )
        self._canonicalize()
        other_mean = other.mean.to(self.device)
        other_m2 = other.m2.to(self.device)
        e = other_mean - self._shift
        scale = n * n_b / n_a
        # The remaining variances first (cheap, (P, d)): refuse before anything changes.
        total = self._comoment.diagonal(dim1=1, dim2=2)
        remaining = total - other_m2.diagonal(dim1=1, dim2=2) - e.square() * scale
        largest = total.amax(dim=1, keepdim=True)  # per position: the scale of its rounding
        if bool((remaining < -_NEGATIVE_VARIANCE_TOLERANCE * largest).any()):
            worst = float((remaining / largest.clamp_min(torch.finfo(torch.float64).tiny)).min())
            raise ValueError(
                f"removing these {n_b} images would leave a negative variance ({worst:.3g} of the position's "
                "largest): they are not all part of these statistics, or were embedded differently"
            )
        chunk = _position_chunk(self.num_positions, self.dim, 1)
        for start in range(0, self.num_positions, chunk):
            stop = start + chunk
            d = e[start:stop]
            self._comoment[start:stop].sub_(other_m2[start:stop])
            self._comoment[start:stop].baddbmm_(d.unsqueeze(2), d.unsqueeze(1), alpha=-scale)
        self._shift.sub_(e, alpha=n_b / n_a)
        self.n = n_a
        return self

    def copy(self) -> GaussianAccumulator:
        """An independent copy of the statistics (same device)."""
        self._canonicalize()
        state = {
            "n": torch.tensor([self.n], dtype=torch.int64),
            "mean": self._shift.clone(),
            "m2": self._comoment.clone(),
        }
        return GaussianAccumulator.from_state_dict(state, device=self.device)

    def covariance(self, ddof: int = 1, eps: float = 0.0) -> torch.Tensor:
        """Per-position covariance matrices.

        Args:
            ddof: Delta degrees of freedom (1 = unbiased, as ``numpy.cov``).
            eps: Added to every diagonal entry.

        Returns:
            Float64 tensor of shape ``(P, d, d)``.

        Raises:
            PadimError: If fewer than ``ddof + 1`` vectors were seen.
        """
        self._check_count(ddof)
        covariance = self.m2 / (self.n - ddof)
        if eps:
            covariance.diagonal(dim1=1, dim2=2).add_(eps)
        return covariance

    def covariance_block(self, start: int, stop: int, eps: float, shrinkage: str = "fixed") -> torch.Tensor:
        """Regularised covariances of positions ``start:stop`` (bounded memory for large ``d``).

        Args:
            start: First position.
            stop: One past the last position.
            eps: Added to every diagonal entry after any shrinkage.
            shrinkage: ``"fixed"`` (the paper: ``S + eps I``) or ``"oas"`` (Oracle Approximating
                Shrinkage of Chen et al. 2010 towards ``tr(S)/d I``, in the unbiased scale, see
                :func:`oas_shrink`; then ``+ eps I``).

        Returns:
            Float64 tensor of shape ``(stop - start, d, d)``.
        """
        self._check_count(1)
        covariance = self.m2[start:stop] / (self.n - 1)
        if shrinkage == "oas":
            covariance = oas_shrink(covariance, self.n)
        elif shrinkage != "fixed":
            raise ValueError(f"unknown covariance estimator '{shrinkage}'")
        covariance.diagonal(dim1=1, dim2=2).add_(eps)
        return covariance

    def finalize(self, eps: float = 0.01, shrinkage: str = "fixed") -> GaussianEstimate:
        """Means and regularised covariances of every position.

        Args:
            eps: Diagonal regularisation (the paper's 0.01).
            shrinkage: See :meth:`covariance_block`.

        Returns:
            The per-position Gaussians, float64.
        """
        covariance = self.covariance_block(0, self.num_positions, eps, shrinkage)
        return GaussianEstimate(mean=self.mean.clone(), covariance=covariance, n=self.n)

    def state_dict(self, packed: bool = False) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the accumulator (for safetensors).

        Args:
            packed: Store only the lower triangle of each symmetric ``M2`` (half the bytes).

        Returns:
            ``{"n": (1,) int64, "mean": (P, d) float64, "m2": (P, d, d) float64}``, or with
            ``"m2_packed": (P, d (d + 1) / 2)`` instead of ``"m2"`` when packed.
        """
        self._canonicalize()
        state = {"n": torch.tensor([self.n], dtype=torch.int64), "mean": self.mean.contiguous()}
        if packed:
            state["m2_packed"] = pack_lower(self.m2)
        else:
            state["m2"] = self.m2.contiguous()
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> GaussianAccumulator:
        """Rebuild an accumulator saved with :meth:`state_dict`.

        Args:
            state: The saved tensors.
            device: Where to place the state.

        Returns:
            The accumulator.

        Raises:
            PadimError: If tensors are missing or inconsistent.
        """
        try:
            n, mean = state["n"], state["mean"]
            if "m2_packed" in state and mean.ndim == 2:
                m2 = unpack_lower(state["m2_packed"], int(mean.shape[1]), symmetric=True)
            else:
                m2 = state["m2"]
        except KeyError as exc:
            raise PadimError(f"statistics file lacks tensor {exc}") from exc
        if mean.ndim != 2 or m2.shape != (mean.shape[0], mean.shape[1], mean.shape[1]) or n.numel() != 1:
            raise PadimError(
                f"inconsistent statistics: mean {tuple(mean.shape)}, m2 {tuple(m2.shape)}, n {tuple(n.shape)}"
            )
        accumulator = cls.__new__(cls)
        accumulator.num_positions, accumulator.dim = int(mean.shape[0]), int(mean.shape[1])
        accumulator.n = int(n.item())
        accumulator._shift = mean.to(device=device, dtype=torch.float64)
        accumulator._sum = torch.zeros_like(accumulator._shift)
        accumulator._comoment = m2.to(device=device, dtype=torch.float64)
        accumulator._canonical = True
        return accumulator

    def _check_shape(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The embeddings, after checking ``d`` and ``P``."""
        p = embeddings.shape[2] * embeddings.shape[3] if embeddings.ndim == 4 else embeddings.shape[-1]
        if embeddings.ndim not in (3, 4) or embeddings.shape[1] != self.dim or p != self.num_positions:
            raise ValueError(
                f"expected embeddings of shape (B, {self.dim}, {self.num_positions}) or (B, {self.dim}, H, W), "
                f"got {tuple(embeddings.shape)}"
            )
        return embeddings

    def _check_count(self, ddof: int) -> None:
        if self.n <= ddof:
            raise PadimError(f"need at least {ddof + 1} training images to estimate a covariance, got {self.n}")


def pool_positions(accumulator: GaussianAccumulator) -> GaussianAccumulator:
    """The statistics of every patch row of every position together: one shared Gaussian.

    Exact, from the per-position statistics alone (law of total covariance; every position has
    the same count ``n``)::

        mean = mean_p mu_p
        M2   = sum_p M2_p + n sum_p (mu_p - mean)(mu_p - mean)^T

    which equals ``numpy.cov`` over the ``n P`` rows ``(n P, d)`` of all positions.

    Args:
        accumulator: Per-position statistics ``P`` x ``d``.

    Returns:
        A one-position accumulator holding ``n P`` vectors.

    Raises:
        PadimError: If the accumulator is empty.
    """
    if accumulator.n == 0:
        raise PadimError("need at least one training image to pool the statistics")
    means = accumulator.mean  # (P, d) float64
    pooled_mean = means.mean(dim=0)
    spread = means - pooled_mean
    m2 = accumulator.m2.sum(dim=0) + accumulator.n * (spread.T @ spread)
    state = {
        "n": torch.tensor([accumulator.n * accumulator.num_positions], dtype=torch.int64),
        "mean": pooled_mean.unsqueeze(0),
        "m2": m2.unsqueeze(0),
    }
    return GaussianAccumulator.from_state_dict(state, device=accumulator.device)
