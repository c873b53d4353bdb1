"""Tasks of the promotion gate and of retention: the calibration pool, the gate, pruning."""

from __future__ import annotations

from padim_prefect.tasks.policy import TASK_OPTIONS
from prefect import get_run_logger, task

from padim.core.execution import resolve_device
from padim.io.artifact import load_model, read_training_images
from padim.io.store import ModelStore
from padim.jobs.calibration_pool import grow_pool, read_pool
from padim.jobs.promotion import GateDecision, check_candidate
from padim.settings import GateSettings, TrainSettings


@task(name="grow-calibration-pool", **TASK_OPTIONS)
def grow_pool_task(store_url: str, product: str, versions: list[str]) -> int:
    """Add the held-out calibration images of model versions to the product's calibration pool.

    Args:
        store_url: Model store root.
        product: Product name.
        versions: Complete versions whose calibration images join the pool.

    Returns:
        The number of images in the pool afterwards.
    """
    store = ModelStore(store_url)
    size = 0
    for version in versions:
        held_out = read_training_images(store.version_url(product, version))["calibration"]
        size = len(grow_pool(store, product, held_out, version))
    get_run_logger().info("calibration pool of %s: %d normal images", product, size)
    return size


@task(name="promotion-gate", **TASK_OPTIONS)
def gate_task(
    store_url: str,
    product: str,
    candidate: str,
    in_use: str,
    defect_uris: list[str],
    gate: GateSettings,
    settings: TrainSettings,
) -> GateDecision:
    """Check a candidate version against the version in use on the pool and the reference defects.

    Args:
        store_url: Model store root.
        product: Product name.
        candidate: The candidate version.
        in_use: The version in use.
        defect_uris: Reference defect images (may be empty).
        gate: The gate's bounds.
        settings: Device, batch size and backbone runtime.

    Returns:
        The decision; how the pool's false alarms were counted (out of sample, or in sample and
        why) is in its fields and notes, which the retrain's model card lists.
    """
    store = ModelStore(store_url)
    device = resolve_device(settings.device)
    models = []
    for version in (candidate, in_use):
        # The candidate's statistics: the gate removes the pool images from a copy of them to count
        # false alarms out of sample (padim.jobs.calibration_pool.score_pool).
        model = load_model(store.version_url(product, version), device=device, with_statistics=version == candidate)
        model.path, model.runtime, model.precision = settings.path, settings.runtime, settings.precision
        models.append(model)
    pool = read_pool(store, product)
    return check_candidate(models[0], models[1], pool, defect_uris, gate, batch_size=settings.batch_size)


@task(name="prune-versions", **TASK_OPTIONS)
def prune_task(store_url: str, product: str, keep: int | None) -> list[str]:
    """Remove a product's old versions beyond ``keep`` (never the one in use or a candidate).

    Args:
        store_url: Model store root.
        product: Product name.
        keep: Newest versions to keep; ``None`` keeps all.

    Returns:
        The removed versions.
    """
    if keep is None:
        return []
    removed = ModelStore(store_url).prune(product, keep)
    if removed:
        get_run_logger().info("removed %d old version(s) of %s (keep %d): %s", len(removed), product, keep, removed)
    return removed
