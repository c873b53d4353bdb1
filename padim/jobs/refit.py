"""Incremental refits: the version a retrain builds on, and the checks that new images fit its statistics.

A retrain continues the float64 statistics of the version in use (:func:`load_base_model`) with
the same channel reduction (:func:`same_projection`) and refuses a requested configuration that
differs from the stored one (:func:`check_refit_config`), so the result equals a fit on all images.
"""

from __future__ import annotations

import torch

from padim.core.config import PadimConfig
from padim.core.embedding import EmbeddingProjector
from padim.core.execution import resolve_device
from padim.core.model import PadimModel
from padim.errors import ConfigError
from padim.io.artifact import load_model
from padim.io.store import ModelStore


def same_projection(stored: EmbeddingProjector, drawn: EmbeddingProjector) -> bool:
    """Whether a model's stored channel reduction equals the one this installation draws from its seed.

    Args:
        stored: The projector saved with the model.
        drawn: The projector :func:`padim.core.geometry.new_projector` builds now.

    Returns:
        True when both select the same channels (or the same projection).
    """
    for name in ("indices", "projection"):
        a, b = getattr(stored, name), getattr(drawn, name)
        if (a is None) != (b is None):
            return False
        if a is not None and (a.shape != b.shape or not torch.equal(a.cpu(), b.cpu())):
            return False
    return True


def load_base_model(store: ModelStore, product: str, device: str | torch.device = "cpu") -> PadimModel:
    """Load a product's latest model with its statistics, for an incremental refit.

    Args:
        store: Model store.
        product: Product name.
        device: Device for the statistics.

    Returns:
        The model, with ``accumulator`` set.
    """
    return load_model(store.latest_url(product), device=resolve_device(device), with_statistics=True)


def check_refit_config(base: PadimModel, requested: PadimConfig | None) -> PadimConfig:
    """The configuration of an incremental refit: the base model's, unless another is asked for.

    Args:
        base: The model to add images to.
        requested: A configuration the caller asked for, or ``None``.

    Returns:
        The configuration to use.

    Raises:
        ConfigError: If ``requested`` changes the embedding (then only a full refit is possible).
    """
    if requested is None:
        return base.config
    if requested.feature_identity() != base.config.feature_identity():
        raise ConfigError("the requested configuration changes the embedding of the images; run a full refit instead")
    return requested
