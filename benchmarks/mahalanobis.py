"""Whitening factor against explicit inverse for the batched Mahalanobis step (the design choice).

Both forms cost one ``(P, d, d) @ (P, d, B)`` product per batch:

* whitening (ours): ``W = L^{-1}`` with ``S = L L^T``; distance ``= ||W (x - mu)||``;
* inverse (anomalib): ``S^{-1}``; distance ``= sqrt((x - mu)^T S^{-1} (x - mu))``.

``W`` is lower triangular, so it can also be applied in row blocks that skip its zero upper
triangle (:class:`padim.core.mahalanobis.TriangleBlocks`, what scoring uses on a CPU): two thirds of
the arithmetic at d = 100. All three are timed on the whole ``(B, d, P)`` batch.

This script times both on the same random statistics and batches, times the finalisation of each
(Cholesky + triangular inverse vs. a general inverse), and reports how far each lands from a
float64 reference (the inverse form can give small negative squared distances, clamped to 0).

    python benchmarks/mahalanobis.py --d 100 --batch 32
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from padim.core.mahalanobis import mahalanobis_distances, triangle_blocks, whitening_factor


def best_of(step: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def inverse_distances(embeddings: torch.Tensor, mean: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The explicit-inverse form: ``(B, d, P)`` -> ``(B, P)``."""
    centred = embeddings.permute(2, 1, 0) - mean.unsqueeze(2)  # (P, d, B)
    projected = torch.bmm(inverse, centred)
    squared = (centred * projected).sum(dim=1)
    return squared.clamp_min(0).sqrt().transpose(0, 1)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=3136)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    p, d, b = args.positions, args.d, args.batch
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(p, d, 3 * d, generator=generator, dtype=torch.float64)
    covariance = samples @ samples.transpose(1, 2) / (3 * d) + 0.01 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(p, d, generator=generator, dtype=torch.float64)
    embeddings = (mean.T.unsqueeze(0) + torch.randn(b, d, p, generator=generator, dtype=torch.float64)).float()

    t_whiten = best_of(lambda: whitening_factor(covariance), 1)
    t_inverse = best_of(lambda: torch.linalg.inv(covariance), 1)
    factor = whitening_factor(covariance).float()
    inverse = torch.linalg.inv(covariance).float()
    mean32 = mean.float()
    reference = mahalanobis_distances(embeddings.double(), mean, whitening_factor(covariance))
    ours = mahalanobis_distances(embeddings, mean32, factor)
    theirs = inverse_distances(embeddings, mean32, inverse)
    blocks = triangle_blocks(factor)
    blocked = mahalanobis_distances(embeddings, mean32, blocks)
    t_ours = best_of(lambda: mahalanobis_distances(embeddings, mean32, factor), args.repeats)
    t_theirs = best_of(lambda: inverse_distances(embeddings, mean32, inverse), args.repeats)
    t_blocked = best_of(lambda: mahalanobis_distances(embeddings, mean32, blocks), args.repeats)
    record = {
        "bench": "mahalanobis",
        "positions": p,
        "d": d,
        "batch": b,
        "threads": torch.get_num_threads(),
        "whitening_batch_seconds": t_ours,
        "inverse_batch_seconds": t_theirs,
        "whitening_over_inverse_time": t_ours / t_theirs,
        "triangle_blocks_batch_seconds": t_blocked,
        "triangle_blocks_over_whitening_time": t_blocked / t_ours,
        "triangle_blocks_max_rel_error": float(((blocked.double() - reference) / reference).abs().max()),
        "finalise_whitening_seconds": t_whiten,
        "finalise_inverse_seconds": t_inverse,
        "whitening_max_rel_error": float(((ours.double() - reference) / reference).abs().max()),
        "inverse_max_rel_error": float(((theirs.double() - reference) / reference).abs().max()),
    }
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
