"""The retrain flow: add newly arrived normal images to a product's model, or refit it from scratch."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.params import check_folder, check_outside_store, check_product, open_store
from flows.runners import task_runner_from_env
from flows.train import artifact_key, failure_summary, fit_and_publish, summarise_version
from padim.artifact import check_servable, read_training_images
from padim.errors import ConfigError
from padim.products import read_product_settings
from padim.settings import Precision, Runtime, TrainSettings, default_of
from padim.training import MIN_FIT_IMAGES, TrainingPlan, plan_training
from tasks.events import MODEL_PUBLISHED, emit_event_task, publish_artifacts_task
from tasks.storage import list_images_task


def plan_refit(new: list[str], settings: TrainSettings) -> TrainingPlan:
    """Shards of new images, holding some out for re-calibration when there are enough.

    Args:
        new: New image URIs.
        settings: Shard size and hold-out options.

    Returns:
        The plan; its hold-out is empty when the new images are too few to split.
    """
    if len(new) >= settings.min_holdout + MIN_FIT_IMAGES:
        return plan_training(new, settings)
    shards = [new[i : i + settings.shard_size] for i in range(0, len(new), settings.shard_size)]
    return TrainingPlan(fit_shards=shards, holdout=[])


@flow(name="padim-retrain", task_runner=task_runner_from_env(), validate_parameters=True)
def retrain(
    product: str,
    reason: str = "manual",
    normal_url: str | None = None,
    full: bool = False,
    store: str | None = None,
    batch_size: int | None = default_of(TrainSettings, "batch_size"),
    device: str = default_of(TrainSettings, "device"),
    shard_size: int = default_of(TrainSettings, "shard_size"),
    runtime: Runtime = default_of(TrainSettings, "runtime"),
    precision: Precision = default_of(TrainSettings, "precision"),
) -> dict[str, Any]:
    """Update a product's model with new normal images and publish a new version.

    Incremental (the default): images under ``normal_url`` that are not yet in the model (by URI
    and by content hash) are embedded and merged into the latest version's statistics, exactly as
    if the model had been fitted on all images at once. Part of the new images is held out to
    re-calibrate the thresholds against the updated model (then merged too); with fewer new
    images than a hold-out needs, the previous thresholds are kept. ``full=True`` refits from
    scratch on the previous training images plus the new ones, with a fresh held-out split.

    Args:
        product: Product name (must have a model).
        reason: Why (``manual``, ``padim.normal-images.added``, ``padim.drift.detected``...).
        normal_url: Folder of new normal images; default the product's landing folder, else
            the folder it was trained from. An empty string counts as not given (event templates).
        full: Refit from scratch.
        store: Store root.
        batch_size: Images per backbone batch; ``None`` fits the device.
        device: ``auto``, ``cpu`` or ``cuda``.
        shard_size: Images per fit task.
        runtime: Where the backbone runs (``auto``, ``torch``, ``openvino``).
        precision: Arithmetic of the OpenVINO backbone (``f32``, ``bf16``).

    Returns:
        ``status`` (``published`` or ``unchanged``), the version and counts.
    """
    logger = get_run_logger()
    check_product(product)
    model_store = open_store(store)
    base_version = model_store.latest(product)
    base_url = model_store.version_url(product, base_version)
    manifest = model_store.read_manifest(product, base_version)
    config = check_servable(manifest)
    thresholds = manifest.get("thresholds") or {}
    settings = TrainSettings(
        batch_size=batch_size,
        device=device,
        runtime=runtime,
        precision=precision,
        shard_size=shard_size,
        image_fpr=float(thresholds.get("image_fpr", default_of(TrainSettings, "image_fpr"))),
        pixel_fpr=float(thresholds.get("pixel_fpr", default_of(TrainSettings, "pixel_fpr"))),
    )
    product_settings = read_product_settings(model_store, product)
    source = normal_url or product_settings.landing_url or product_settings.normal_url
    if not source:
        raise ConfigError(f"no folder of new normal images for {product!r}: pass normal_url or configure a landing_url")
    check_outside_store(check_folder(source, "normal images"), model_store, "normal images")
    uris = list_images_task(source)
    known = read_training_images(base_url)
    known_uris = {u for u, _ in known["fit"]} | {u for u, _ in known["calibration"]}
    if full:
        everything = sorted({u for u, _ in known["fit"]} | {u for u, _ in known["calibration"]} | set(uris))
        plan = plan_training(everything, settings)
        published, outcomes = fit_and_publish(model_store, product, config, plan, settings)
    else:
        new = [u for u in uris if u not in known_uris]
        logger.info("%s: %d images under %s, %d new", product, len(uris), source, len(new))
        if not new:
            return {"product": product, "status": "unchanged", "version": base_version, "n_new": 0, "reason": reason}
        plan = plan_refit(new, settings)
        exclude = frozenset(h for _, h in known["fit"]) | frozenset(h for _, h in known["calibration"])
        published, outcomes = fit_and_publish(
            model_store, product, config, plan, settings, incremental=True, exclude_sha256=exclude
        )
        if published is None:
            return {"product": product, "status": "unchanged", "version": base_version, "n_new": 0, "reason": reason}
    emit_event_task(
        MODEL_PUBLISHED,
        product,
        {"version": published.version, "url": published.url, "n_train": published.n_train, "reason": reason},
    )
    publish_artifacts_task(artifact_key("model", product), summarise_version(published))
    return {
        "product": product,
        "status": "published",
        "version": published.version,
        "previous_version": base_version,
        "n_train": published.n_train,
        "n_new": sum(o.n_images for o in outcomes),
        **failure_summary(published),
        "full": full,
        "reason": reason,
        "image_threshold": published.image_threshold,
    }
