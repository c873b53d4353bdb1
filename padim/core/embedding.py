"""Multi-scale patch embeddings and the reduction of their channels to ``d``.

Feature maps of the tapped stages (strides 4, 8, 16) are brought to the stride-4 grid by nearest
upsampling and concatenated; every patch position then has a ``D``-dimensional vector. The paper
keeps a fixed random subset of ``d`` channels; a semi-orthogonal projection (Kim et al. 2021,
"Semi-orthogonal embedding for efficient unsupervised anomaly segmentation") is offered as an
alternative. Either is stored with the model as a tensor.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from padim.errors import ConfigError


def select_channel_indices(total: int, d: int, seed: int) -> torch.Tensor:
    """Draw the paper's fixed random channel subset.

    Args:
        total: Channels ``D`` of the concatenated embedding.
        d: Channels to keep.
        seed: Seed of the draw; the same seed always gives the same subset.

    Returns:
        Sorted ``int64`` indices, shape ``(d,)``.

    Raises:
        ConfigError: If ``d`` is not in ``[1, D]``.
    """
    if not 1 <= d <= total:
        raise ConfigError(f"channels must be between 1 and {total} for this backbone, got {d}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:d].sort().values


def semi_orthogonal_projection(total: int, d: int, seed: int) -> torch.Tensor:
    """Draw a random ``D x d`` matrix with orthonormal columns (QR of a Gaussian matrix).

    Args:
        total: Channels ``D`` of the concatenated embedding.
        d: Output dimension.
        seed: Seed of the draw.

    Returns:
        Float32 matrix ``W`` of shape ``(D, d)`` with ``W.T @ W = I``.

    Raises:
        ConfigError: If ``d`` is not in ``[1, D]``.
    """
    if not 1 <= d <= total:
        raise ConfigError(f"channels must be between 1 and {total} for this backbone, got {d}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(total, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))
    return q.float()


class EmbeddingProjector(nn.Module):
    """Concatenate tapped feature maps on the stride-4 grid and reduce them to ``d`` channels.

    Exactly one of ``indices`` and ``projection`` is set; both ``None`` keeps all ``D`` channels.

    Args:
        stage_channels: Channels of each tapped stage, e.g. ``(24, 40, 112)``.
        indices: Kept channel indices into the concatenation, shape ``(d,)``.
        projection: Projection matrix, shape ``(D, d)``.
    """

    def __init__(
        self,
        stage_channels: tuple[int, ...],
        indices: torch.Tensor | None = None,
        projection: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if indices is not None and projection is not None:
            raise ValueError("give either channel indices or a projection, not both")
        self.stage_channels = tuple(stage_channels)
        total = sum(self.stage_channels)
        self.register_buffer("indices", indices.long() if indices is not None else None)
        self.register_buffer("projection", projection.float() if projection is not None else None)
        self._per_stage: list[torch.Tensor] = []
        if indices is not None:
            if indices.ndim != 1 or indices.numel() == 0:
                raise ValueError(f"channel indices must be a non-empty 1-D tensor, got shape {tuple(indices.shape)}")
            if int(indices.min()) < 0 or int(indices.max()) >= total:
                raise ValueError(f"channel indices must lie in [0, {total})")
        # Selecting per stage before upsampling equals selecting after the concatenation only for
        # strictly increasing indices (the order is kept, no channel repeats); any other index
        # tensor (e.g. from another tool's artifact) is applied to the full concatenation.
        if indices is not None and bool((indices[1:] > indices[:-1]).all()):
            offsets = [0]
            for channels in self.stage_channels:
                offsets.append(offsets[-1] + channels)
            for start, stop in itertools.pairwise(offsets):
                chosen = indices[(indices >= start) & (indices < stop)] - start
                self._per_stage.append(chosen.long())
        if projection is not None and projection.shape[0] != total:
            raise ValueError(f"projection must have {total} rows, got {projection.shape[0]}")

    @property
    def out_channels(self) -> int:
        """Embedding dimension ``d``."""
        if self.indices is not None:
            return int(self.indices.numel())
        if self.projection is not None:
            return int(self.projection.shape[1])
        return sum(self.stage_channels)

    def stage_counts(self) -> tuple[int, ...] | None:
        """Kept channels of each stage, in output order, when the output is grouped by stage.

        ``None`` for a projection (channels are mixed) or an unsorted index list.
        """
        if self.projection is not None:
            return None
        if self.indices is None:
            return self.stage_channels
        if not self._per_stage:
            return None
        return tuple(int(chosen.numel()) for chosen in self._per_stage)

    def select_stages(self, features: list[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The kept channels of each stage, at the stage's own resolution (no upsampling).

        Only for a projector whose output is grouped by stage (:meth:`stage_counts` is not
        ``None``); stages with no kept channel are left out.

        Args:
            features: Tapped maps, shapes ``(B, C_i, H_i, W_i)``.
            out: Optional contiguous ``(B, H_i, W_i, c_i)`` tensors, one per kept stage, to write
                the selections into (no allocation).

        Returns:
            Shapes ``(B, c_i, H_i, W_i)``, in output channel order: views of ``out`` when given;
            channels-last for channels-last maps (as the network produces them).

        Raises:
            ValueError: For a projection or an unsorted index list, or ``out`` of the wrong length.
        """
        counts = self.stage_counts()
        if counts is None:
            raise ValueError("this channel reduction mixes or reorders the stages' channels")
        kept = [(stage, f) for stage, (f, c) in enumerate(zip(features, counts, strict=True)) if c > 0]
        if out is not None and len(out) != len(kept):
            raise ValueError(f"expected {len(kept)} output tensors, got {len(out)}")
        selected = []
        for index, (stage, feature) in enumerate(kept):
            rows = feature.permute(0, 2, 3, 1)  # (B, H_i, W_i, C_i); a view for channels-last maps
            chosen = self._selection(stage, feature.device)
            target = out[index] if out is not None else None
            if chosen is None or chosen.numel() == feature.shape[1]:
                picked = rows if target is None else target.copy_(rows)
            else:
                picked = select_channels(rows, chosen, out=target)
            selected.append(picked.permute(0, 3, 1, 2))
        return selected

    def embed_stages(self, stage_maps: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        """Build the embedding from the kept channels of each stage (:meth:`select_stages`).

        Equal to :meth:`forward` on the tapped maps the stage maps were selected from.

        Args:
            stage_maps: Shapes ``(B, c_i, H_i, W_i)``, in output channel order.
            grid: ``(H, W)`` of the patch grid (the first tap's resolution).

        Returns:
            Embedding of shape ``(B, d, H, W)`` in channels-last memory format.

        Raises:
            ValueError: If the maps do not hold ``d`` channels in all.
        """
        total = sum(int(m.shape[1]) for m in stage_maps)
        if not stage_maps or total != self.out_channels:
            raise ValueError(f"stage maps hold {total} channels; this embedding has {self.out_channels}")
        first = stage_maps[0]
        out = torch.empty(first.shape[0], *grid, total, dtype=first.dtype, device=first.device)
        offset = 0
        for stage in stage_maps:
            _place_upsampled(out, stage.permute(0, 2, 3, 1), offset)
            offset += int(stage.shape[1])
        return out.permute(0, 3, 1, 2)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Build the embedding.

        Channels are selected per stage before upsampling (equal to selecting after the
        concatenation when the kept indices are strictly increasing, as drawn here, and cheaper).
        The result is written once, channels last: every stage's selected channels are copied
        (repeated by the integer upsampling factor, which is exactly nearest upsampling) into one
        ``(B, H, W, d)`` buffer. That layout keeps each patch's vector contiguous, which is what
        the statistics and the Mahalanobis step read.

        Args:
            features: Tapped maps, shapes ``(B, C_i, H_i, W_i)`` (any memory format), the first
                at the finest stride.

        Returns:
            Embedding of shape ``(B, d, H_0, W_0)`` in channels-last memory format.
        """
        if len(features) != len(self.stage_channels):
            raise ValueError(f"expected {len(self.stage_channels)} feature maps, got {len(features)}")
        for stage, feature in enumerate(features):
            if feature.shape[1] != self.stage_channels[stage]:
                raise ValueError(
                    f"feature map {stage} has {feature.shape[1]} channels, expected {self.stage_channels[stage]}"
                )
        first = features[0]
        batch, (height, width) = first.shape[0], first.shape[-2:]
        selections = [self._selection(stage, f.device) for stage, f in enumerate(features)]
        total = sum(
            f.shape[1] if sel is None else int(sel.numel()) for f, sel in zip(features, selections, strict=True)
        )
        out = torch.empty(batch, height, width, total, dtype=first.dtype, device=first.device)
        offset = 0
        for feature, chosen in zip(features, selections, strict=True):
            if chosen is not None and chosen.numel() == 0:
                continue
            rows = feature.permute(0, 2, 3, 1)  # (B, H_i, W_i, C_i); a view for channels-last maps
            if chosen is not None and chosen.numel() != feature.shape[1]:
                rows = select_channels(rows, chosen)
            _place_upsampled(out, rows, offset)
            offset += rows.shape[3]
        if self.indices is not None and not self._per_stage:
            out = out.index_select(3, self.indices.to(out.device))
        if self.projection is not None:
            out = torch.matmul(out, self.projection.to(device=out.device, dtype=out.dtype))
        return out.permute(0, 3, 1, 2)

    def _selection(self, stage: int, device: torch.device) -> torch.Tensor | None:
        """Channels kept from one stage (``None``: all of them)."""
        if not self._per_stage:
            return None
        return self._per_stage[stage].to(device)


def select_channels(rows: torch.Tensor, chosen: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Channels ``chosen`` of channels-last rows ``(..., C)`` -> ``(..., c)``, contiguous.

    The rows are selected as one 2-D ``(N, C)`` table: ``index_select`` along the last dimension
    of a 4-D tensor ran four times slower on the CPU than along the columns of the same data
    seen as a matrix.

    Args:
        rows: Shape ``(..., C)``.
        chosen: Column indices, shape ``(c,)``.
        out: Optional contiguous result tensor of shape ``(..., c)``.

    Returns:
        Shape ``(..., c)`` (``out`` when given).
    """
    table = rows.reshape(-1, rows.shape[-1])
    if out is None:
        return table.index_select(1, chosen).view(*rows.shape[:-1], chosen.numel())
    torch.index_select(table, 1, chosen, out=out.view(-1, chosen.numel()))
    return out


def _place_upsampled(out: torch.Tensor, rows: torch.Tensor, offset: int) -> None:
    """Copy ``rows`` ``(B, h, w, c)``, nearest-upsampled to ``out``'s grid, into channels ``offset:``.

    An integer factor is a repeat (exactly nearest upsampling); other ratios use
    :func:`torch.nn.functional.interpolate` with ``mode="nearest"``.

    Args:
        out: Buffer of shape ``(B, H, W, d)``.
        rows: Stage features, shape ``(B, h, w, c)``.
        offset: First channel of ``out`` to fill.
    """
    batch, height, width, total = out.shape
    h, w, c = rows.shape[1], rows.shape[2], rows.shape[3]
    target = out[..., offset : offset + c]
    if (h, w) == (height, width):
        target.copy_(rows)
    elif height % h == 0 and width % w == 0:
        kh, kw = height // h, width // w
        grid = out.view(batch, h, kh, w, kw, total)[..., offset : offset + c]
        grid.copy_(rows[:, :, None, :, None, :].expand(batch, h, kh, w, kw, c))
    else:
        upsampled = F.interpolate(rows.permute(0, 3, 1, 2), size=(height, width), mode="nearest")
        target.copy_(upsampled.permute(0, 2, 3, 1))


def build_projector(stage_channels: tuple[int, ...], d: int, method: str, seed: int) -> EmbeddingProjector:
    """Create the channel reduction of a new model.

    Args:
        stage_channels: Channels of each tapped stage.
        d: Embedding dimension to keep.
        method: ``"random"``, ``"semi_orthogonal"`` or ``"all"``.
        seed: Seed of the random draw.

    Returns:
        The projector.

    Raises:
        ConfigError: For an unknown method or an out-of-range ``d``.
    """
    total = sum(stage_channels)
    if method == "random":
        return EmbeddingProjector(stage_channels, indices=select_channel_indices(total, d, seed))
    if method == "semi_orthogonal":
        return EmbeddingProjector(stage_channels, projection=semi_orthogonal_projection(total, d, seed))
    if method == "all":
        return EmbeddingProjector(stage_channels)
    raise ConfigError(f"unknown channel selection '{method}'")


def aggregate_neighbourhood(embeddings: torch.Tensor, size: int) -> torch.Tensor:
    """Locally aware patch features: each embedding averaged over its ``size x size`` neighbourhood.

    As PatchCore does (Roth et al. 2022): ``avg_pool2d`` with stride 1 and padding ``size // 2``,
    the border positions averaging only the neighbours inside the grid (``count_include_pad``
    off), so the grid keeps its size.

    Args:
        embeddings: Shape ``(B, d, H, W)``.
        size: Odd neighbourhood side (1 returns the embeddings unchanged).

    Returns:
        Shape ``(B, d, H, W)``, float32, channels-last.

    Raises:
        ValueError: If ``size`` is not a positive odd number.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"neighbourhood size must be a positive odd number, got {size}")
    if size == 1:
        return embeddings
    pooled = torch.nn.functional.avg_pool2d(
        embeddings.float(), size, stride=1, padding=size // 2, count_include_pad=False
    )
    return pooled.contiguous(memory_format=torch.channels_last)
