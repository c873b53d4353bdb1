"""The retrain flow: add newly arrived normal images to a product's model, or refit it from scratch.

The new version is published as a candidate and becomes the one in use only when it passes the
promotion gate (:mod:`padim.jobs.promotion`); otherwise it stays a candidate, the run logs why and
emits ``padim.model.rejected``, and ``padim models promote`` lets a person decide.
"""

from __future__ import annotations

from typing import Any

from padim_prefect.flows.naming import retrain_run_name
from padim_prefect.flows.params import check_folder, check_outside_store, check_product, open_store
from padim_prefect.flows.runners import task_runner_from_env
from padim_prefect.flows.train import artifact_key, failure_summary, fit_and_publish, summarise_version
from padim_prefect.tasks.events import MODEL_PUBLISHED, MODEL_REJECTED, emit_event_task, publish_artifacts_task
from padim_prefect.tasks.policy import RESULT_OPTIONS
from padim_prefect.tasks.promotion import gate_task, grow_pool_task, prune_task
from padim_prefect.tasks.storage import list_images_task
from prefect import flow, get_run_logger

from padim.errors import ConfigError
from padim.io.artifact import check_servable, read_training_images
from padim.io.store import ModelStore
from padim.jobs.products import ProductSettings, read_product_settings
from padim.jobs.promotion import GateDecision, describe
from padim.jobs.training import MIN_FIT_IMAGES, PublishedModel, TrainingPlan, plan_training
from padim.settings import Precision, Runtime, TrainSettings, default_of


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


def reference_defects(product_settings: ProductSettings, store: ModelStore) -> list[str]:
    """The product's reference defect images (``[]`` when none are configured).

    Raises:
        ConfigError: ``reference_defects_url`` is set but the folder is missing.
    """
    url = product_settings.reference_defects_url
    if not url:
        return []
    what = f"reference defects of {product_settings.product!r} (reference_defects_url, `padim configure`)"
    return list_images_task(check_outside_store(check_folder(url, what), store, what))


def run_gate(
    store: ModelStore,
    product_settings: ProductSettings,
    published: PublishedModel,
    in_use: str,
    settings: TrainSettings,
    overrides: dict[str, float | None],
) -> GateDecision:
    """Check a candidate and promote it when it passes; otherwise record why it stays a candidate.

    Args:
        store: Model store.
        product_settings: The product's settings (gate bounds, reference defects).
        published: The candidate.
        in_use: The version in use.
        settings: Device and runtime to score with.
        overrides: Gate bounds given to the run (``None``: the product's or the default).

    Returns:
        The decision.
    """
    logger = get_run_logger()
    product = published.product
    gate = product_settings.gate(**overrides)
    decision = gate_task(
        store.root, product, published.version, in_use, reference_defects(product_settings, store), gate, settings
    )
    for note in decision.notes:
        logger.warning("promotion gate of %s %s: %s", product, published.version, note)
    if decision.passed:
        store.promote(product, published.version)
        logger.info("%s %s is now in use: promotion gate %s", product, published.version, describe(decision))
        return decision
    store.mark_candidate(product, published.version, describe(decision))
    logger.warning(
        "%s %s stays a candidate, %s remains in use: promotion gate %s (decide with `padim models promote %s %s`)",
        product,
        published.version,
        in_use,
        describe(decision),
        product,
        published.version,
    )
    emit_event_task(
        MODEL_REJECTED,
        product,
        {"version": published.version, "in_use": in_use, "reasons": decision.reasons, **decision.as_dict()},
    )
    return decision


def gate_markdown(decision: GateDecision | None, in_use: str) -> str:
    """Markdown lines about the gate's decision, for the model card artifact."""
    if decision is None:
        return "\n\n**Promotion gate off**: the version was put in use directly."
    verdict = "passed: the version is in use" if decision.passed else f"rejected: {in_use} stays in use"
    lines = ["", "", f"## Promotion gate {verdict}", ""]
    lines += [f"* {reason}" for reason in decision.reasons + decision.notes]
    lines.append(f"* {describe(decision)}")
    return "\n".join(lines)


@flow(
    name="padim-retrain",
    flow_run_name=retrain_run_name,
    **RESULT_OPTIONS,
    task_runner=task_runner_from_env(),
    validate_parameters=True,
)
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
    gate: bool = True,
    max_threshold_change: float | None = None,
    fpr_tolerance: float | None = None,
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
        gate: Publish a candidate and promote it only through the promotion gate; ``False``
            puts the new version in use directly.
        max_threshold_change: Gate bound; ``None``: the product's setting, else
            :attr:`padim.settings.GateSettings.max_threshold_change`.
        fpr_tolerance: Gate bound; ``None``: the product's setting, else
            :attr:`padim.settings.GateSettings.fpr_tolerance`.

    Returns:
        ``status`` (``published``: in use; ``candidate``: rejected by the gate; ``unchanged``),
        the version, counts and the gate's decision.
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
        published, outcomes = fit_and_publish(model_store, product, config, plan, settings, promote=not gate)
    else:
        new = [u for u in uris if u not in known_uris]
        logger.info("%s: %d images under %s, %d new", product, len(uris), source, len(new))
        if not new:
            return {"product": product, "status": "unchanged", "version": base_version, "n_new": 0, "reason": reason}
        plan = plan_refit(new, settings)
        exclude = frozenset(h for _, h in known["fit"]) | frozenset(h for _, h in known["calibration"])
        published, outcomes = fit_and_publish(
            model_store,
            product,
            config,
            plan,
            settings,
            incremental=True,
            exclude_sha256=exclude,
            promote=not gate,
        )
        if published is None:
            return {"product": product, "status": "unchanged", "version": base_version, "n_new": 0, "reason": reason}
    grow_pool_task(model_store.root, product, [base_version, published.version])
    decision = None
    if gate:
        overrides = {"max_threshold_change": max_threshold_change, "fpr_tolerance": fpr_tolerance}
        decision = run_gate(model_store, product_settings, published, base_version, settings, overrides)
    promoted = decision is None or decision.passed
    if promoted:
        emit_event_task(
            MODEL_PUBLISHED,
            product,
            {"version": published.version, "url": published.url, "n_train": published.n_train, "reason": reason},
        )
    publish_artifacts_task(
        artifact_key("model", product), summarise_version(published) + gate_markdown(decision, base_version)
    )
    prune_task(model_store.root, product, product_settings.keep())
    return {
        "product": product,
        "status": "published" if promoted else "candidate",
        "in_use": published.version if promoted else base_version,
        "gate": decision.as_dict() if decision is not None else None,
        "version": published.version,
        "previous_version": base_version,
        "n_train": published.n_train,
        "n_new": sum(o.n_images for o in outcomes),
        **failure_summary(published),
        "full": full,
        "reason": reason,
        "image_threshold": published.image_threshold,
    }
