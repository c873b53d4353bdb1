"""The train flow: fit a product's model from a folder of normal images and publish a version."""

from __future__ import annotations

import uuid
from typing import Any

from padim_prefect.flows.naming import train_run_name
from padim_prefect.flows.params import build_config, check_folder, check_outside_store, check_product, open_store
from padim_prefect.flows.runners import task_runner_from_env
from padim_prefect.tasks.events import MODEL_PUBLISHED, emit_event_task, publish_artifacts_task
from padim_prefect.tasks.policy import RESULT_OPTIONS
from padim_prefect.tasks.promotion import grow_pool_task, prune_task
from padim_prefect.tasks.storage import list_images_task, remove_work_area_task
from padim_prefect.tasks.training import finalize_and_publish_task, fit_shard_task
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from padim.core.alignment import with_reference
from padim.core.config import PadimConfig, Registration, StatisticsMode
from padim.io.store import ModelStore
from padim.jobs.products import read_product_settings, update_product_settings
from padim.jobs.training import PublishedModel, ShardOutcome, TrainingPlan, plan_training
from padim.settings import Precision, Runtime, TrainSettings, default_of


def run_id() -> str:
    """The current flow run's id, or a random one outside a flow run."""
    return str(flow_run.get_id() or uuid.uuid4())


def fit_and_publish(
    store: ModelStore,
    product: str,
    config: PadimConfig,
    plan: TrainingPlan,
    settings: TrainSettings,
    incremental: bool = False,
    exclude_sha256: frozenset[str] = frozenset(),
    promote: bool = True,
) -> tuple[PublishedModel | None, list[ShardOutcome]]:
    """Fan the fit shards out to tasks, then merge, calibrate and publish (shared by train and retrain).

    Partial statistics live under ``<store>/<product>/work/<run id>/`` and are removed afterwards,
    whether the run succeeds or fails; if that clean-up fails (the store is unreachable), a
    warning is logged and the run's own result or error stands.

    Args:
        store: Model store.
        product: Product name.
        config: Model options.
        plan: Fit shards and held-out images.
        settings: Batch size, device, calibration.
        incremental: Add to the latest version's statistics.
        exclude_sha256: Images already in the model.
        promote: Make the new version the one in use (``False``: a candidate for the promotion gate).

    Returns:
        The published version (``None`` for an incremental refit that found no new usable image)
        and the fit tasks' outcomes.
    """
    work = store.artifact_url(product, "work", run_id())
    try:
        futures = [
            fit_shard_task.submit(shard, config, f"{work}/partial-{i:05d}.safetensors", settings, exclude_sha256)
            for i, shard in enumerate(plan.fit_shards)
        ]
        outcomes = [future.result() for future in futures]
        if incremental and not any(o.partial_url for o in outcomes):
            return None, outcomes
        published = finalize_and_publish_task(
            store.root, product, config, outcomes, plan.holdout, settings, incremental=incremental, promote=promote
        )
        return published, outcomes
    finally:
        try:
            remove_work_area_task(work)
        except Exception as exc:  # leftover partials are harmless: never let them hide the run's outcome
            get_run_logger().warning("could not remove the work area %s (%s); delete it later", work, exc)


FAILED_LISTED = 20
"""Skipped training images listed by name in a run's result (all are logged)."""


def failure_summary(published: PublishedModel) -> dict[str, Any]:
    """``n_failed`` and the first :data:`FAILED_LISTED` skipped images with their reasons."""
    return {
        "n_failed": len(published.failed),
        "failed": [{"uri": uri, "reason": reason} for uri, reason in published.failed[:FAILED_LISTED]],
    }


def summarise_version(published: PublishedModel) -> str:
    """Markdown summary of a published version."""
    failed = len(published.failed)
    m = published.manifest
    return "\n".join(
        [
            f"# Model {published.product} {published.version}",
            "",
            "| field | value |",
            "|---|---|",
            f"| backbone | {m.get('backbone')} (weights {str(m.get('weights_sha256'))[:12]}) |",
            f"| input | resize {m.get('image_size')}, crop {m.get('crop_size')} |",
            f"| channels | {m.get('channels')} ({m.get('channel_selection')}) |",
            f"| training images | {published.n_train} |",
            f"| calibration images | {published.n_calibration} |",
            f"| images skipped (unreadable) | {failed} |",
            f"| image threshold | {published.image_threshold:.4f} |",
            f"| pixel threshold | {published.pixel_threshold:.4f} |",
            f"| location | {published.url} |",
        ]
    )


def artifact_key(prefix: str, product: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes)."""
    return f"{prefix}-" + "".join(c if c.isalnum() else "-" for c in product.lower())


@flow(
    name="padim-train",
    flow_run_name=train_run_name,
    **RESULT_OPTIONS,
    task_runner=task_runner_from_env(),
    validate_parameters=True,
)
def train(
    product: str,
    normal_url: str,
    store: str | None = None,
    backbone: str = default_of(PadimConfig, "backbone"),
    weights: str | None = None,
    channels: int | None = None,
    image_size: int = default_of(PadimConfig, "image_size"),
    crop_size: int | None = default_of(PadimConfig, "crop_size"),
    batch_size: int | None = default_of(TrainSettings, "batch_size"),
    device: str = default_of(TrainSettings, "device"),
    shard_size: int = default_of(TrainSettings, "shard_size"),
    holdout_fraction: float = default_of(TrainSettings, "holdout_fraction"),
    calibration_url: str | None = None,
    image_fpr: float = default_of(TrainSettings, "image_fpr"),
    pixel_fpr: float = default_of(TrainSettings, "pixel_fpr"),
    max_skipped_fraction: float = default_of(TrainSettings, "max_skipped_fraction"),
    runtime: Runtime = default_of(TrainSettings, "runtime"),
    precision: Precision = default_of(TrainSettings, "precision"),
    statistics: StatisticsMode = default_of(PadimConfig, "statistics"),
    augment_copies: int = default_of(PadimConfig, "augment_copies"),
    augment_seed: int = default_of(PadimConfig, "augment_seed"),
    augment_shift: float = default_of(PadimConfig, "augment_shift"),
    augment_rotation: float = default_of(PadimConfig, "augment_rotation"),
    augment_flip: bool = default_of(PadimConfig, "augment_flip"),
    neighbourhood: int = default_of(PadimConfig, "neighbourhood"),
    tolerance: int = default_of(PadimConfig, "tolerance"),
    registration: Registration = default_of(PadimConfig, "registration"),
    reference: str | None = default_of(PadimConfig, "reference"),
) -> dict[str, Any]:
    """Fit a product's model on normal images and publish it as a new version.

    Every default comes from :class:`padim.core.config.PadimConfig` (the model) and
    :class:`padim.settings.TrainSettings` (the job), the same place ``padim train`` reads them.

    Args:
        product: Product name (``^[a-z0-9][a-z0-9._-]{0,63}$``).
        normal_url: Folder (local or ``s3://``) of images of good parts.
        store: Store root; default ``$PADIM_STORE`` or ``./padim-store``.
        backbone: ``efficientnet_lite0``, ``resnet18`` or ``wide_resnet50_2``.
        weights: Backbone weights file (path or ``s3://``), ``"random"`` for tests.
        channels: Embedding dimension ``d``; ``None`` is the backbone's default.
        image_size: Resize side.
        crop_size: Centre-crop side after resizing; ``None`` inspects the whole resized image.
        batch_size: Images per backbone batch; ``None`` fits the device.
        device: ``auto``, ``cpu`` or ``cuda``.
        shard_size: Images per fit task.
        holdout_fraction: Share of normal images held out to calibrate the threshold.
        calibration_url: Separate folder of normal images for calibration.
        image_fpr: Target false-positive rate of the image threshold.
        pixel_fpr: Target false-positive rate of the pixel threshold.
        max_skipped_fraction: Largest share of unusable training images before nothing is published.
        runtime: Where the backbone runs: ``auto`` (OpenVINO on a CPU when installed), ``torch``
            or ``openvino``.
        precision: Arithmetic of the OpenVINO backbone: ``f32`` or ``bf16``.
        statistics: ``position``, ``shared`` or ``both`` Gaussians (parts that are not aligned;
            this and the options below are documented in :class:`padim.core.config.PadimConfig`).
        augment_copies: Randomly shifted/rotated copies fitted per normal image (0 = off).
        augment_seed: Seed of the copies' transforms.
        augment_shift: Largest shift of a copy (share of the side).
        augment_rotation: Largest rotation of a copy (degrees).
        augment_flip: Also flip the copies at random.
        neighbourhood: Odd side of the neighbourhood each patch's features are averaged over.
        tolerance: Chebyshev radius (patches) of tolerant scoring.
        registration: ``none`` or ``phase`` (translate each image onto the reference).
        reference: Reference image of the registration; default the first training image.

    Returns:
        ``version``, ``n_train``, ``n_calibration``, ``n_failed`` (with the first reasons in
        ``failed``), thresholds and the version URL.
    """
    logger = get_run_logger()
    check_product(product)
    config = build_config(
        backbone,
        weights,
        channels,
        image_size,
        crop_size,
        statistics=statistics,
        augment_copies=augment_copies,
        augment_seed=augment_seed,
        augment_shift=augment_shift,
        augment_rotation=augment_rotation,
        augment_flip=augment_flip,
        neighbourhood=neighbourhood,
        tolerance=tolerance,
        registration=registration,
        reference=reference,
    )
    settings = TrainSettings(
        batch_size=batch_size,
        device=device,
        shard_size=shard_size,
        holdout_fraction=holdout_fraction,
        calibration_url=calibration_url,
        image_fpr=image_fpr,
        pixel_fpr=pixel_fpr,
        max_skipped_fraction=max_skipped_fraction,
        runtime=runtime,
        precision=precision,
    )
    model_store = open_store(store)
    check_outside_store(check_folder(normal_url, "normal images"), model_store, "normal images")
    if calibration_url:
        check_outside_store(check_folder(calibration_url, "calibration images"), model_store, "calibration images")
    uris = list_images_task(normal_url)
    calibration = list_images_task(calibration_url) if calibration_url else None
    plan = plan_training(uris, settings, calibration)
    config = with_reference(config, plan.fit_shards[0][0] if plan.fit_shards else None)  # one for every shard
    logger.info(
        "training %s on %d images in %d shard(s), %d held out",
        product,
        plan.n_fit,
        len(plan.fit_shards),
        len(plan.holdout),
    )
    published, _ = fit_and_publish(model_store, product, config, plan, settings)
    if published is None:  # only incremental refits can publish nothing
        raise RuntimeError("training published no model")
    update_product_settings(model_store, product, normal_url=normal_url)
    for uri, reason in published.failed:
        logger.warning("skipped %s: %s", uri, reason)
    emit_event_task(
        MODEL_PUBLISHED,
        product,
        {"version": published.version, "url": published.url, "n_train": published.n_train, "reason": "train"},
    )
    publish_artifacts_task(artifact_key("model", product), summarise_version(published))
    grow_pool_task(model_store.root, product, [published.version])
    prune_task(model_store.root, product, read_product_settings(model_store, product).keep())
    return {
        "product": product,
        "version": published.version,
        "url": published.url,
        "n_train": published.n_train,
        "n_calibration": published.n_calibration,
        **failure_summary(published),
        "image_threshold": published.image_threshold,
        "pixel_threshold": published.pixel_threshold,
    }
