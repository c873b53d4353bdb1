"""Distances of patch embeddings to a model's Gaussians.

:func:`gaussian_distances` combines per-position, shared and tolerant statistics
(``PadimConfig.statistics``, ``tolerance``); :func:`banded_distances` scores a batch a band of grid
rows at a time straight from the stage maps on a CPU (no whole-batch embedding).
"""

from __future__ import annotations

import math

import torch

from padim.core.config import PadimConfig
from padim.core.embedding import EmbeddingProjector, aggregate_neighbourhood
from padim.core.mahalanobis import (
    TriangleBlocks,
    mahalanobis_distances,
    shared_distances,
    tolerant_distances,
    whitened_norms,
)


def gaussian_distances(
    embeddings: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor, config: PadimConfig
) -> torch.Tensor:
    """Distances of every patch under a configuration's statistics and scoring options.

    The plain route of the remedies for unaligned parts: the neighbourhood average of the
    embeddings, then the per-position Gaussians (tolerant within ``config.tolerance``), the
    shared Gaussian, or the smaller of both.

    Args:
        embeddings: Shape ``(B, d, H, W)``.
        mean: Means of :func:`num_gaussians` Gaussians, shape ``(G, d)``.
        factor: Their whitening matrices ``(G, d, d)`` (or :class:`TriangleBlocks` for ``"position"``).
        config: Model options.

    Returns:
        Shape ``(B, H, W)``.
    """
    embeddings = aggregate_neighbourhood(embeddings, config.neighbourhood)
    positions = embeddings.shape[2] * embeddings.shape[3]
    if config.statistics == "shared":
        return shared_distances(embeddings, mean, factor)
    if config.statistics == "position":
        return tolerant_distances(embeddings, mean, factor, config.tolerance)
    local = tolerant_distances(embeddings, mean[:positions], factor[:positions], config.tolerance)
    return torch.minimum(local, shared_distances(embeddings, mean[positions:], factor[positions:]))


TRIANGLE_BYTES = 1 << 30
"""Largest factor scored in :class:`TriangleBlocks` on a CPU (they add two thirds of its memory)."""


BAND_BYTES = 4 << 20
"""Bytes of float32 embedding scored at once by :func:`banded_distances` (fits the CPU caches)."""


def banded_distances(
    maps: list[torch.Tensor],
    mean: torch.Tensor,
    factor: torch.Tensor | TriangleBlocks,
    grid: tuple[int, int],
    projector: EmbeddingProjector | None = None,
    band_bytes: int = BAND_BYTES,
) -> torch.Tensor | None:
    """Mahalanobis distances of a batch, a band of grid rows at a time.

    Without a projector, ``maps`` are the embedding's channels of each stage
    (:meth:`padim.core.features.FeatureExtractor.stage_maps`) and each band's centred vectors
    ``x - mu`` are written straight from their rows (nearest upsampling and centring in one
    pass), then whitened while they are in the caches. With a projector (a projection mixes the
    stages), ``maps`` are the tapped maps and each band is embedded first. The whole batch's
    embedding (40 MB at B = 32, d = 100) is never written, transposed or allocated (an
    allocation that size is mapped from the OS and page-faulted in). The distances are those of
    :func:`padim.core.mahalanobis.mahalanobis_distances` on the whole embedding.

    Args:
        maps: Stage maps ``(B, c_i, H_i, W_i)`` in channel order, the first on the grid itself.
        mean: Per-position means, shape ``(P, d)``.
        factor: Whitening matrices, shape ``(P, d, d)``, or their :class:`TriangleBlocks`.
        grid: ``(H, W)`` of the patch grid.
        projector: The model's channel reduction when ``maps`` are the raw tapped maps.
        band_bytes: Target size of one band's vectors.

    Returns:
        Distances ``(B, H, W)``, or ``None`` when the maps are not the grid divided by integer
        factors (then bands would not line up; embed the whole batch instead).
    """
    height, width = grid
    ratios = []
    for feature in maps:
        h, w = feature.shape[-2:]
        if height % h or width % w or height // h != width // w:
            return None
        ratios.append(height // h)
    if ratios[0] != 1 or (projector is None and sum(m.shape[1] for m in maps) != mean.shape[1]):
        return None
    step = math.lcm(*ratios)
    batch, d = maps[0].shape[0], mean.shape[1]
    rows = max(step, band_bytes // max(4 * batch * width * d, 1) // step * step)
    if projector is None:
        buffer = torch.empty(min(rows, height), width, batch, d, dtype=mean.dtype, device=mean.device)
    norms = []
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        first, last = top * width, bottom * width
        rows_factor = factor.positions(first, last) if isinstance(factor, TriangleBlocks) else factor[first:last]
        if projector is not None:  # embed the band, then score it as a whole embedding
            part = [f[:, :, top // r : bottom // r] for f, r in zip(maps, ratios, strict=True)]
            distances = mahalanobis_distances(projector(part), mean[first:last], rows_factor)  # (B, rows, W)
            norms.append(distances.flatten(1).transpose(0, 1))
            continue
        centred = buffer[: bottom - top]  # (rows, W, B, d)
        offset = 0
        for group, r in zip(maps, ratios, strict=True):
            h, w, c = (bottom - top) // r, width // r, group.shape[1]
            source = group[:, :, top // r : bottom // r].permute(2, 3, 0, 1)  # (h, w, B, c)
            source = source[:, None, :, None].expand(h, r, w, r, batch, c)  # nearest upsampling
            target = centred.view(h, r, w, r, batch, d)[..., offset : offset + c]
            centre = mean[first:last].view(h, r, w, r, 1, d)[..., offset : offset + c]
            torch.sub(source, centre, out=target)
            offset += c
        norms.append(whitened_norms(centred.view(-1, batch, d), rows_factor))
    return torch.cat(norms).transpose(0, 1).reshape(batch, height, width)
