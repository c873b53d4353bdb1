"""Batched Mahalanobis distances against a whitening factor computed once per model.

For each position the covariance is factored once, ``S = L L^T`` (Cholesky), and the model keeps
the whitening matrix ``W = L^{-1}`` (lower triangular). The distance of a vector ``x`` is then
``||W (x - mu)||``: one batched matrix product over all positions of a whole batch of images, no
Python loop over positions, and always non-negative (an explicit inverse can give small negative
squared distances through rounding). Whitening and the explicit inverse cost the same per batch
(a ``(P, d, d) @ (P, d, B)`` product); BENCHMARKS.md records the measurement.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from padim.core.statistics import GaussianAccumulator, patch_rows


def whitening_factor(covariance: torch.Tensor) -> torch.Tensor:
    """Compute ``W = L^{-1}`` for ``covariance = L L^T``.

    Args:
        covariance: Symmetric positive definite matrices, shape ``(P, d, d)``.

    Returns:
        Lower-triangular whitening matrices, shape ``(P, d, d)``, same dtype.

    Raises:
        ValueError: If a covariance is not positive definite.
    """
    lower, info = torch.linalg.cholesky_ex(covariance)
    if bool((info > 0).any()):
        bad = int(torch.nonzero(info > 0)[0, 0])
        raise ValueError(f"covariance at position {bad} is not positive definite; increase eps")
    eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
    return torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)


def whitening_from_accumulator(
    accumulator: GaussianAccumulator,
    eps: float,
    shrinkage: str = "fixed",
    dtype: torch.dtype = torch.float32,
    chunk: int = 64,
) -> torch.Tensor:
    """Finalise an accumulator straight into whitening factors, a chunk of positions at a time.

    The float64 covariances of all positions never exist at once, which keeps WideResNet50
    (``d = 550``: 7.6 GB of float64 covariances) within memory. The chunk's covariance, Cholesky
    factor and inverse live in three buffers of this call, reused from chunk to chunk: fresh
    allocations of that size are mapped from the OS and page-faulted in every time, which cost a
    quarter of the whole step (BENCHMARKS.md).

    Args:
        accumulator: Fitted statistics.
        eps: Diagonal regularisation.
        shrinkage: Covariance estimator, see :meth:`GaussianAccumulator.covariance_block`.
        dtype: Storage dtype of the factor.
        chunk: Positions per chunk.

    Returns:
        Whitening factors, shape ``(P, d, d)``.

    Raises:
        ValueError: If a covariance is not positive definite.
    """
    p, d = accumulator.num_positions, accumulator.dim
    device = accumulator.device
    factor = torch.empty(p, d, d, dtype=dtype, device=device)
    if shrinkage != "fixed":  # OAS builds its own tensors; the plain path below avoids every allocation
        for start in range(0, p, chunk):
            stop = min(p, start + chunk)
            covariance = accumulator.covariance_block(start, stop, eps, shrinkage)
            factor[start:stop].copy_(whitening_factor(covariance))  # converts while copying: one pass
        return factor
    accumulator.covariance_block(0, 1, eps)  # checks the image count (PadimError below two)
    m2, scale = accumulator.m2, 1.0 / (accumulator.n - 1)
    covariance = torch.empty(min(chunk, p), d, d, dtype=torch.float64, device=device)
    lower, whitening = torch.empty_like(covariance), torch.empty_like(covariance)
    info = torch.empty(min(chunk, p), dtype=torch.int32, device=device)
    eye = torch.eye(d, dtype=torch.float64, device=device)
    for start in range(0, p, chunk):
        stop = min(p, start + chunk)
        k = stop - start
        torch.mul(m2[start:stop], scale, out=covariance[:k])
        covariance[:k].diagonal(dim1=1, dim2=2).add_(eps)
        torch.linalg.cholesky_ex(covariance[:k], out=(lower[:k], info[:k]))
        if bool((info[:k] > 0).any()):
            bad = start + int(torch.nonzero(info[:k] > 0)[0, 0])
            raise ValueError(f"covariance at position {bad} is not positive definite; increase eps")
        torch.linalg.solve_triangular(lower[:k], eye.expand(k, d, d), upper=False, out=whitening[:k])
        factor[start:stop].copy_(whitening[:k])  # converts while copying: one pass
    return factor


TRIANGLE_BLOCK = 32
"""Rows of the whitening factor per product when its zero upper triangle is skipped."""


@dataclass(frozen=True)
class TriangleBlocks:
    """A lower-triangular factor cut into row blocks, each without its zero columns.

    Row block ``a:b`` of ``W`` only has non-zero columns ``:b``; with ``k`` blocks the products
    need ``(k + 1) / (2k)`` of the full product's arithmetic (two thirds at d = 100), and each
    block is small enough for the core's cache. Each block is stored transposed and contiguous,
    ``W[:, a:b, :b]^T`` of shape ``(P, b, b - a)``, ready to multiply row vectors from the right.

    Attributes:
        rows: ``(a, b)`` row range of each block, covering ``0:d`` in order.
        blocks: The transposed blocks, shapes ``(P, b, b - a)``.
    """

    rows: tuple[tuple[int, int], ...]
    blocks: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        """Memory of the blocks."""
        return sum(block.numel() * block.element_size() for block in self.blocks)

    def positions(self, start: int, stop: int) -> TriangleBlocks:
        """The blocks of positions ``start:stop`` (views)."""
        return TriangleBlocks(self.rows, tuple(block[start:stop] for block in self.blocks))


def row_blocks(d: int, block: int = TRIANGLE_BLOCK) -> list[tuple[int, int]]:
    """Split ``d`` factor rows into about equal blocks of roughly ``block`` rows.

    Args:
        d: Rows (the embedding dimension).
        block: Target rows per block.

    Returns:
        ``(start, stop)`` row ranges covering ``0:d`` in order.
    """
    k = max(1, d // block)
    edges = [round(i * d / k) for i in range(k + 1)]
    return list(itertools.pairwise(edges))


def is_lower_triangular(factor: torch.Tensor, chunk: int = 256) -> bool:
    """Whether every matrix of ``factor`` ``(P, d, d)`` is zero above its diagonal (checked in chunks)."""
    return all(
        not bool(torch.triu(factor[start : start + chunk], diagonal=1).any())
        for start in range(0, factor.shape[0], chunk)
    )


def triangle_blocks(factor: torch.Tensor, block: int = TRIANGLE_BLOCK) -> TriangleBlocks:
    """Cut a lower-triangular factor into :class:`TriangleBlocks`.

    Args:
        factor: Lower-triangular whitening matrices, shape ``(P, d, d)``.
        block: Target rows per block.

    Returns:
        The blocks (about two thirds of the factor's memory at d = 100).

    Raises:
        ValueError: If a matrix has a non-zero entry above its diagonal.
    """
    if factor.ndim != 3 or factor.shape[1] != factor.shape[2]:
        raise ValueError(f"factor must have shape (P, d, d), got {tuple(factor.shape)}")
    if not is_lower_triangular(factor):
        raise ValueError("the factor is not lower triangular; use the full product")
    rows = tuple(row_blocks(factor.shape[1], block))
    return TriangleBlocks(rows, tuple(factor[:, a:b, :b].transpose(1, 2).contiguous() for a, b in rows))


def whitened_norms(
    centred: torch.Tensor, factor: torch.Tensor | TriangleBlocks, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``||W_p (x - mu_p)||`` of centred row vectors, position by position.

    Args:
        centred: ``x - mu`` as rows, shape ``(c, B, d)`` (c positions, B images), float32 or
            float64 (cast to the factor's dtype for the product only).
        factor: The ``c`` positions' whitening matrices ``(c, d, d)``, or their
            :class:`TriangleBlocks`.
        out: Optional result tensor, shape ``(c, B)``.

    Returns:
        Distances, shape ``(c, B)``, in ``centred``'s dtype.
    """
    accumulate = centred.dtype
    dtype = factor.blocks[0].dtype if isinstance(factor, TriangleBlocks) else factor.dtype
    operand = centred.to(dtype)
    if isinstance(factor, TriangleBlocks):
        squares = out if out is not None else centred.new_empty(centred.shape[:2])
        squares.zero_()
        for (_, bottom), block in zip(factor.rows, factor.blocks, strict=True):
            part = torch.bmm(operand[:, :, :bottom], block).to(accumulate)
            squares.add_(part.square_().sum(dim=2))
        return squares.sqrt_()
    whitened = torch.bmm(operand, factor.transpose(1, 2)).to(accumulate)
    return torch.linalg.vector_norm(whitened, dim=2, out=out)


def mahalanobis_distances(
    embeddings: torch.Tensor,
    mean: torch.Tensor,
    factor: torch.Tensor | TriangleBlocks,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mahalanobis distance of every position of every image in a batch.

    Args:
        embeddings: Shape ``(B, d, H, W)`` or ``(B, d, P)``.
        mean: Per-position means, shape ``(P, d)``.
        factor: Whitening matrices ``L^{-1}``, shape ``(P, d, d)``, or the same cut into
            :class:`TriangleBlocks` (the zero upper triangle skipped: faster on a CPU).
        chunk: Positions per matrix product (bounds temporary memory); ``None`` picks blocks of
            about 4 MB of temporaries, which also keeps them in the CPU caches.

    The vectors are centred in at least float32 and only then cast to ``factor``'s dtype: with a
    float16/bfloat16 factor, casting the raw embeddings first would round away most of
    ``x - mean`` (embeddings sit far from the origin) and move the distances by several percent.

    Returns:
        Distances (not squared), shape ``(B, H, W)`` or ``(B, P)``: float64 for a float64
        factor, float32 otherwise (a float16/bfloat16 factor is accumulated and returned in
        float32).

    Raises:
        ValueError: If the shapes are inconsistent.
    """
    spatial = embeddings.shape[2:]
    rows = patch_rows(embeddings)  # (B, P, d): a view of channels-last embeddings
    b, p, d = rows.shape
    if isinstance(factor, TriangleBlocks):
        reference = factor.blocks[0]
        factor_shape = (reference.shape[0], factor.rows[-1][1], factor.rows[-1][1])
    else:
        reference, factor_shape = factor, tuple(factor.shape)
    if mean.shape != (p, d) or factor_shape != (p, d, d):
        raise ValueError(f"embeddings (B, {d}, {p}) do not match mean {tuple(mean.shape)} and factor {factor_shape}")
    dtype = reference.dtype
    accumulate = torch.promote_types(dtype, torch.float32)
    # Blocks of positions small enough for the CPU caches (about 4 MB of temporaries; blocks of
    # 8 MB ran about 1.4x slower at d = 100, B = 32).
    step = max(1, chunk if chunk is not None else (4 << 20) // (4 * d * max(b, 1)))
    out = torch.empty(p, b, dtype=accumulate, device=rows.device)
    for start in range(0, p, step):
        stop = min(p, start + step)
        # (c, B, d) rows: whitening from the right, x W^T, keeps every vector contiguous.
        centred = rows[:, start:stop].transpose(0, 1).to(accumulate) - mean[start:stop].to(accumulate).unsqueeze(1)
        part = factor.positions(start, stop) if isinstance(factor, TriangleBlocks) else factor[start:stop]
        whitened_norms(centred, part, out=out[start:stop])
    return out.transpose(0, 1).reshape(b, *spatial)


def shared_distances(embeddings: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of every patch to one Gaussian shared by all positions.

    Args:
        embeddings: Shape ``(B, d, H, W)`` or ``(B, d, P)``.
        mean: The shared mean, shape ``(1, d)`` or ``(d,)``.
        factor: The shared whitening matrix, shape ``(1, d, d)`` or ``(d, d)``.

    Returns:
        Distances, shape ``(B, H, W)`` or ``(B, P)``, float32 (float64 for a float64 factor).

    Raises:
        ValueError: If the shapes are inconsistent.
    """
    spatial = embeddings.shape[2:]
    rows = patch_rows(embeddings)  # (B, P, d)
    b, p, d = rows.shape
    mean, factor = mean.reshape(-1), factor.reshape(factor.shape[-2], factor.shape[-1])
    if mean.shape != (d,) or factor.shape != (d, d):
        raise ValueError(f"embeddings (B, {d}, {p}) do not match the shared mean {tuple(mean.shape)}")
    accumulate = torch.promote_types(factor.dtype, torch.float32)
    flat = rows.reshape(b * p, d)
    out = torch.empty(b * p, dtype=accumulate, device=rows.device)
    step = max(1, (4 << 20) // (4 * d))
    for start in range(0, b * p, step):
        centred = flat[start : start + step].to(accumulate) - mean.to(accumulate)
        whitened = (centred.to(factor.dtype) @ factor.T).to(accumulate)
        torch.linalg.vector_norm(whitened, dim=1, out=out[start : start + step])
    return out.reshape(b, *spatial)


TOLERANCE_BYTES = 256 << 20
"""Bytes of shifted float32 embeddings :func:`tolerant_distances` scores in one call."""


def tolerant_distances(
    embeddings: torch.Tensor,
    mean: torch.Tensor,
    factor: torch.Tensor | TriangleBlocks,
    radius: int,
    budget_bytes: int = TOLERANCE_BYTES,
) -> torch.Tensor:
    """Tolerant Mahalanobis distances: each patch against the Gaussians of its neighbourhood.

    ``D[b, i, j] = min over |di|, |dj| <= radius of ||W_q (x[b, i, j] - mu_q)||`` with
    ``q = (i + di, j + dj)`` inside the grid (``radius = 0`` is PaDiM). The embedding is shifted
    by every offset at once (the offsets are stacked on the batch axis, in groups of at most
    ``budget_bytes``) and scored by :func:`mahalanobis_distances`; nothing loops over patches.

    Args:
        embeddings: Shape ``(B, d, H, W)``.
        mean: Per-position means, shape ``(H W, d)``.
        factor: Whitening matrices ``(H W, d, d)`` or their :class:`TriangleBlocks`.
        radius: Chebyshev radius in patches.
        budget_bytes: Largest shifted embedding scored in one call.

    Returns:
        Distances, shape ``(B, H, W)``.

    Raises:
        ValueError: If ``radius`` is negative or the embedding is not ``(B, d, H, W)``.
    """
    if radius < 0:
        raise ValueError(f"tolerance radius must be >= 0, got {radius}")
    if embeddings.ndim != 4:
        raise ValueError(f"tolerant scoring needs embeddings of shape (B, d, H, W), got {tuple(embeddings.shape)}")
    if radius == 0:
        return mahalanobis_distances(embeddings, mean, factor)
    b, d, h, w = embeddings.shape
    r = radius
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    padded = torch.nn.functional.pad(embeddings, (r, r, r, r))  # (B, d, H + 2r, W + 2r)
    group = max(1, budget_bytes // max(4 * b * d * h * w, 1))
    best = None
    for first in range(0, len(offsets), group):
        chosen = offsets[first : first + group]
        # shifted[o][q] = x[q - o]: the patch scored against the Gaussian at q.
        shifted = torch.cat([padded[:, :, r - dy : r - dy + h, r - dx : r - dx + w] for dy, dx in chosen])
        scored = mahalanobis_distances(shifted.contiguous(memory_format=torch.channels_last), mean, factor)
        scored = torch.nn.functional.pad(scored.view(len(chosen), b, h, w), (r, r, r, r), value=math.inf)
        # back to patches: the patch p was scored against p + o at index p + o.
        for k, (dy, dx) in enumerate(chosen):
            part = scored[k, :, r + dy : r + dy + h, r + dx : r + dx + w]
            best = part.clone() if best is None else torch.minimum(best, part, out=best)
    if best is None:
        raise ValueError("no offset to score")
    return best
