"""Batched Mahalanobis distances against a whitening factor computed once per model.

For each position the covariance is factored once, ``S = L L^T`` (Cholesky), and the model keeps
the whitening matrix ``W = L^{-1}`` (lower triangular). The distance of a vector ``x`` is then
``||W (x - mu)||``: one batched matrix product over all positions of a whole batch of images, no
Python loop over positions, and always non-negative (an explicit inverse can give small negative
squared distances through rounding). Whitening and the explicit inverse cost the same per batch
(a ``(P, d, d) @ (P, d, B)`` product); BENCHMARKS.md records the measurement.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from padim.statistics import GaussianAccumulator, patch_rows


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """Run batched small-matrix LAPACK work on one CPU thread.

    torch splits each batch of small Cholesky/triangular solves across its thread pool, with a
    barrier per call; when another process competes for the cores those barriers stall, and the
    factorisation of a model became 9x slower on 2 threads than on 1 (measured: 2.7 s vs 0.3 s
    per 512 positions at d = 100). One thread keeps the finalisation fast and steady.

    Args:
        device: Where the work runs; only the CPU is affected.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    chunk: int = 512,
) -> torch.Tensor:
    """Finalise an accumulator straight into whitening factors, a chunk of positions at a time.

    The float64 covariances of all positions never exist at once, which keeps WideResNet50
    (``d = 550``: 7.6 GB of float64 covariances) within memory.

    Args:
        accumulator: Fitted statistics.
        eps: Diagonal regularisation.
        shrinkage: Covariance estimator, see :meth:`GaussianAccumulator.covariance_block`.
        dtype: Storage dtype of the factor.
        chunk: Positions per chunk.

    Returns:
        Whitening factors, shape ``(P, d, d)``.
    """
    p, d = accumulator.num_positions, accumulator.dim
    factor = torch.empty(p, d, d, dtype=dtype, device=accumulator.device)
    with single_threaded(factor.device):
        for start in range(0, p, chunk):
            stop = min(p, start + chunk)
            covariance = accumulator.covariance_block(start, stop, eps, shrinkage)
            factor[start:stop] = whitening_factor(covariance).to(dtype)
    return factor


def mahalanobis_distances(
    embeddings: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Mahalanobis distance of every position of every image in a batch.

    Args:
        embeddings: Shape ``(B, d, H, W)`` or ``(B, d, P)``.
        mean: Per-position means, shape ``(P, d)``.
        factor: Whitening matrices ``L^{-1}``, shape ``(P, d, d)``.
        chunk: Positions per matrix product (bounds temporary memory); ``None`` picks blocks of
            about 8 MB of temporaries, which also keeps them in the CPU caches.

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
    if mean.shape != (p, d) or factor.shape != (p, d, d):
        raise ValueError(
            f"embeddings (B, {d}, {p}) do not match mean {tuple(mean.shape)} and factor {tuple(factor.shape)}"
        )
    dtype = factor.dtype
    accumulate = torch.promote_types(dtype, torch.float32)
    # Blocks of positions small enough for the CPU caches (about 8 MB of temporaries).
    step = max(1, chunk if chunk is not None else (8 << 20) // (4 * d * max(b, 1)))
    out = torch.empty(p, b, dtype=accumulate, device=rows.device)
    for start in range(0, p, step):
        stop = min(p, start + step)
        # (c, B, d) rows: whitening from the right, x W^T, keeps every vector contiguous.
        centred = rows[:, start:stop].transpose(0, 1).to(accumulate) - mean[start:stop].to(accumulate).unsqueeze(1)
        whitened = torch.bmm(centred.to(dtype), factor[start:stop].transpose(1, 2))
        out[start:stop] = torch.linalg.vector_norm(whitened.to(accumulate), dim=2)
    return out.transpose(0, 1).reshape(b, *spatial)
