"""What a configuration implies for a model's shape.

The channels ``d``, the patch grid ``(H, W)``, the number of Gaussians and the channel reduction.
"""

from __future__ import annotations

from padim.core.backbones import BackboneSpec, get_spec
from padim.core.config import PadimConfig
from padim.core.embedding import EmbeddingProjector, build_projector


def resolve_channels(config: PadimConfig, spec: BackboneSpec) -> int:
    """Embedding dimension ``d`` of a configuration.

    Args:
        config: Model options.
        spec: The backbone's description.

    Returns:
        ``config.channels``, the backbone default when unset, or ``D`` for ``"all"``.
    """
    if config.channel_selection == "all":
        return spec.total_channels
    return config.channels if config.channels is not None else spec.default_channels


def grid_size(config: PadimConfig, spec: BackboneSpec) -> tuple[int, int]:
    """Side lengths ``(h, w)`` of the patch grid (stride of the first tap).

    Args:
        config: Model options.
        spec: The backbone's description.

    Returns:
        ``(S / stride, S / stride)``.
    """
    side = -(-config.input_size // spec.strides[0])
    return side, side


def num_gaussians(config: PadimConfig, grid: tuple[int, int]) -> int:
    """Number of Gaussians a model of ``config`` holds (rows of its ``mean`` and ``factor``).

    Args:
        config: Model options (``statistics``).
        grid: ``(H, W)`` of the patch grid.

    Returns:
        ``H W`` per-position Gaussians, 1 shared one, or ``H W + 1`` (the shared one last).
    """
    positions = grid[0] * grid[1]
    return {"position": positions, "shared": 1, "both": positions + 1}[config.statistics]


def new_projector(config: PadimConfig) -> EmbeddingProjector:
    """Channel reduction of a configuration (deterministic: a function of the seed).

    Args:
        config: Model options.

    Returns:
        The projector every shard and every refit of this configuration shares.
    """
    spec = get_spec(config.backbone)
    return build_projector(spec.channels, resolve_channels(config, spec), config.channel_selection, config.seed)
