"""Tasks of the train flow."""

from __future__ import annotations

from collections.abc import Sequence

from padim_prefect.tasks.policy import TASK_OPTIONS
from prefect import get_run_logger, task

from padim.core.config import PadimConfig
from padim.io.store import ModelStore
from padim.jobs.refit import load_base_model
from padim.jobs.training import PublishedModel, ShardOutcome, finalize_and_publish, fit_shard
from padim.settings import TrainSettings


@task(name="fit-shard", **TASK_OPTIONS)
def fit_shard_task(
    uris: list[str],
    config: PadimConfig,
    partial_url: str,
    settings: TrainSettings,
    exclude_sha256: frozenset[str] = frozenset(),
) -> ShardOutcome:
    """Fit one shard of normal images; its statistics go to ``partial_url``.

    Args:
        uris: The shard's images.
        config: Model options.
        partial_url: Where the partial statistics are written.
        settings: Batch size and device.
        exclude_sha256: Images already in the model (incremental refits).

    Returns:
        The outcome (URL and per-image results, no tensors).
    """
    outcome = fit_shard(uris, config, partial_url, settings, exclude_sha256)
    logger = get_run_logger()
    logger.info("fitted %d images in %.1f s (%d failed)", outcome.n_images, outcome.seconds, len(outcome.failed))
    for uri, reason in outcome.failed:
        logger.warning("skipped %s: %s", uri, reason)
    return outcome


@task(name="finalize-and-publish", **TASK_OPTIONS)
def finalize_and_publish_task(
    store_url: str,
    product: str,
    config: PadimConfig,
    outcomes: Sequence[ShardOutcome],
    holdout: list[str],
    settings: TrainSettings,
    incremental: bool = False,
    promote: bool = True,
) -> PublishedModel:
    """Merge the shards, calibrate on held-out images and publish a new version.

    Args:
        store_url: Model store root.
        product: Product name.
        config: Model options.
        outcomes: The fit tasks' outcomes.
        holdout: Held-out normal images.
        settings: Calibration options.
        incremental: Add to the latest version's statistics instead of starting afresh.
        promote: Make the new version the one in use (``False``: a candidate for the gate).

    Returns:
        The published version.
    """
    store = ModelStore(store_url)
    base = load_base_model(store, product, settings.device) if incremental else None
    published = finalize_and_publish(store, product, config, outcomes, holdout, settings, base=base, promote=promote)
    get_run_logger().info(
        "published %s %s%s: %d training images, threshold %.3f",
        product,
        published.version,
        "" if promote else " as a candidate",
        published.n_train,
        published.image_threshold,
    )
    return published
