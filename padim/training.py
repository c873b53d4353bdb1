"""The steps of fitting a product model, as plain functions the train flow composes.

1. :func:`plan_training` splits the listed normal images into fit shards and a held-out
   calibration set (or takes a separate calibration folder).
2. :func:`fit_shard` fits one shard and writes its partial statistics to storage, returning only
   the file's URL and per-image outcomes (so a Dask worker never ships GBs back).
3. :func:`finalize_and_publish` merges the partials (exact Chan merge, in any order), finalises a
   provisional model, scores the held-out images with it (out-of-sample scores set the thresholds),
   folds their embeddings into the statistics on the same pass, and publishes the model of all
   images atomically.

Merging the held-out images after calibrating loses no training data, and on both benchmark data
sets it kept the realised false-positive rate on unseen normal images nearer the target than a
model without them (BENCHMARKS.md). An incremental refit holds out part of the *new* images to
re-calibrate; with too few new images it keeps the previous thresholds.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from padim.artifact import load_model, load_statistics, save_model, save_statistics, training_set_digest
from padim.backbones import get_backbone
from padim.calibration import split_holdout
from padim.config import PadimConfig
from padim.embedding import EmbeddingProjector
from padim.engine import Calibration, calibrate, fit_images
from padim.errors import ConfigError, IncompatibleModelError, PadimError
from padim.images import ImageRecord
from padim.model import (
    PadimFitter,
    PadimModel,
    TrainingInfo,
    build_model,
    images_in,
    new_projector,
    resolve_device,
)
from padim.settings import TrainSettings
from padim.statistics import GaussianAccumulator
from padim.store import ModelStore

MIN_FIT_IMAGES = 2


@dataclass
class TrainingPlan:
    """Which images go where.

    Attributes:
        fit_shards: Image URIs per fit task.
        holdout: Held-out normal image URIs for calibration.
    """

    fit_shards: list[list[str]]
    holdout: list[str]

    @property
    def n_fit(self) -> int:
        """Number of images planned for the statistics."""
        return sum(len(shard) for shard in self.fit_shards)


@dataclass
class ShardOutcome:
    """What one fit task produced.

    Attributes:
        partial_url: URL of the partial statistics (``None`` when no image of the shard was usable).
        n_images: Images in the partial statistics.
        fitted: ``(uri, sha256)`` of the images in the statistics.
        failed: ``(uri, reason)`` of the skipped images.
        skipped: URIs skipped because they are already in the model (incremental refits).
        seconds: Wall time.
    """

    partial_url: str | None
    n_images: int
    fitted: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class PublishedModel:
    """A newly published model version.

    Attributes:
        product: Product name.
        version: Version name.
        url: Folder URL of the version.
        n_train: Images in the statistics.
        n_calibration: Held-out images the thresholds were set on.
        image_threshold: Calibrated image threshold.
        pixel_threshold: Calibrated pixel threshold.
        manifest: The version's manifest (without the file list).
        failed: ``(uri, reason)`` of the training and calibration images that could not be used.
    """

    product: str
    version: str
    url: str
    n_train: int
    n_calibration: int
    image_threshold: float
    pixel_threshold: float
    manifest: dict[str, Any]
    failed: list[tuple[str, str]] = field(default_factory=list)


def config_identity(config: PadimConfig, weights_sha256: str) -> str:
    """String identity of what makes embeddings comparable (stored with partial statistics).

    Args:
        config: Model options.
        weights_sha256: Backbone weights digest.

    Returns:
        Canonical JSON.
    """
    identity = {**config.feature_identity(), "weights": None, "weights_sha256": weights_sha256}
    return json.dumps(identity, sort_keys=True)


def relative_to_common(uris: Sequence[str]) -> Callable[[str], str]:
    """Key of an image relative to the folder all the images share.

    The held-out split then depends on the images' names inside the training folder, not on where
    that folder lives: the same images copied elsewhere (or to S3) get the same split.

    Args:
        uris: The listed images.

    Returns:
        A function mapping a URI to its path below the common folder.
    """
    prefix = os.path.commonprefix(list(uris))  # noqa: RUF071 - URLs too; cut at the last "/" below
    prefix = prefix[: prefix.rfind("/") + 1]
    return lambda uri: uri[len(prefix) :]


def plan_training(
    uris: Sequence[str], settings: TrainSettings, calibration_uris: Sequence[str] | None = None
) -> TrainingPlan:
    """Split normal images into fit shards and a calibration hold-out.

    Args:
        uris: Listed normal images (sorted).
        settings: Split options.
        calibration_uris: Images of a separate calibration folder, if one was given.

    Returns:
        The plan.

    Raises:
        PadimError: If there are too few images to fit and calibrate.
    """
    if not uris:
        raise PadimError("no images found to train on (looked for png, jpg, jpeg, bmp, tif, tiff)")
    if calibration_uris is not None:
        fit, holdout = list(uris), list(calibration_uris)
    else:
        try:
            split = split_holdout(
                list(uris), settings.holdout_fraction, settings.min_holdout, settings.seed, key=relative_to_common(uris)
            )
        except ValueError as exc:
            raise PadimError(f"only {len(uris)} normal images: {exc}") from exc
        fit, holdout = split.fit, split.holdout
    if not holdout:
        raise PadimError("no normal images to calibrate the decision threshold on")
    shards = [fit[i : i + settings.shard_size] for i in range(0, len(fit), settings.shard_size)]
    return TrainingPlan(fit_shards=shards, holdout=list(holdout))


def fit_shard(
    uris: Sequence[str],
    config: PadimConfig,
    partial_url: str,
    settings: TrainSettings,
    exclude_sha256: frozenset[str] = frozenset(),
    description: str = "fit",
) -> ShardOutcome:
    """Fit one shard (:func:`padim.engine.fit_images`) and write its partial statistics.

    Args:
        uris: The shard's images.
        config: Model options.
        partial_url: Where to write the partial statistics.
        settings: Batch size, device and compute path.
        exclude_sha256: Content hashes to leave out (images already in the model); they are
            read and hashed, not decoded.
        description: Progress-bar label.

    Returns:
        The shard outcome; ``partial_url`` is ``None`` when no image was usable.

    Raises:
        ImageReadError: Storage could not deliver an image (the task is retried; nothing is written).
    """
    skip = (lambda _uri, sha256: sha256 in exclude_sha256) if exclude_sha256 else None
    result = fit_images(
        uris,
        config,
        batch_size=settings.batch_size,
        device=settings.device,
        path=settings.path,
        runtime=settings.runtime,
        precision=settings.precision,
        skip=skip,
        description=description,
    )
    outcome = ShardOutcome(
        partial_url=None,
        n_images=result.accumulator.n,
        fitted=[(r.uri, r.sha256 or "") for r in result.fitted],
        failed=[(r.uri, r.error or "unreadable") for r in result.failed],
        skipped=[r.uri for r in result.skipped],
    )
    if outcome.n_images:
        identity = config_identity(config, result.weights_sha256)
        save_statistics(result.accumulator, partial_url, {"identity": identity})
        outcome.partial_url = partial_url
    outcome.seconds = result.seconds
    return outcome


def merge_partials(
    urls: Sequence[str], expected_identity: str | None, device: str | torch.device = "cpu"
) -> GaussianAccumulator:
    """Merge partial statistics files (exact; any order gives the same result).

    Args:
        urls: Partial statistics URLs.
        expected_identity: Configuration identity every partial must carry, or ``None``.
        device: Device for the merge.

    Returns:
        The merged statistics.

    Raises:
        PadimError: If there is nothing to merge or a partial belongs to another configuration.
    """
    if not urls:
        raise PadimError("no usable training image: every image failed to load")
    merged: GaussianAccumulator | None = None
    for url in urls:
        accumulator, metadata = load_statistics(url, device=device)
        if expected_identity is not None and metadata.get("identity") != expected_identity:
            raise PadimError(f"partial statistics {url} were computed with another configuration")
        merged = accumulator if merged is None else merged.merge(accumulator)
    if merged is None:
        raise PadimError("no partial statistics to merge")
    return merged


def finalize_and_publish(
    store: ModelStore,
    product: str,
    config: PadimConfig,
    outcomes: Sequence[ShardOutcome],
    holdout: Sequence[str],
    settings: TrainSettings,
    base: PadimModel | None = None,
    promote: bool = True,
) -> PublishedModel:
    """Merge shard statistics, calibrate on held-out images and publish a model version.

    Args:
        store: Model store.
        product: Product name.
        config: Model options.
        outcomes: Fit-task outcomes (their partial files are merged).
        holdout: Held-out normal image URIs: scored out of sample to set the thresholds, then
            merged into the statistics. Empty only for an incremental refit with too few new
            images to hold any out; the new version then keeps the base model's thresholds.
        settings: Calibration and device options.
        base: A previous model whose statistics the new images are added to (incremental refit);
            must carry its accumulator.
        promote: Make the new version the one in use; ``False`` publishes a candidate for the
            promotion gate (:mod:`padim.promotion`).

    Returns:
        The published version.

    Raises:
        PadimError: If fewer than two images are in the statistics or no held-out image can be
            scored.
    """
    device = resolve_device(settings.device)
    weights_sha256 = get_backbone(
        config.backbone, config.weights, device, settings.runtime, settings.precision
    ).weights_sha256
    identity = config_identity(config, weights_sha256)
    partials = [o.partial_url for o in outcomes if o.partial_url]
    images = [pair for o in outcomes for pair in o.fitted]
    if base is not None:
        if base.accumulator is None:
            raise PadimError("the previous model has no statistics to add to; refit from scratch")
        if not same_projection(base.projector, new_projector(config)):
            raise IncompatibleModelError(
                "this installation draws a different channel subset for the model's seed than the one stored "
                "with the model (another torch version?); new images cannot be added: run a full refit"
            )
        accumulator = base.accumulator
        if partials:
            accumulator.merge(merge_partials(partials, identity, device))
        images = list(base.training.training_images) + images
    else:
        accumulator = merge_partials(partials, identity, device)
    if accumulator.n < MIN_FIT_IMAGES:
        raise PadimError(
            f"only {accumulator.n} usable training image(s): need at least {MIN_FIT_IMAGES} to estimate a covariance"
        )
    failed = [pair for o in outcomes for pair in o.failed]
    n_listed = sum(len(o.fitted) + len(o.failed) for o in outcomes)
    if holdout:
        calibrated = calibrate_and_merge(config, accumulator, weights_sha256, images, holdout, settings)
        model = calibrated.model
        failed += [(r.uri, r.error or "unreadable") for r in calibrated.calibration.failed]
        n_listed += len(holdout)
    elif base is not None and base.thresholds is not None:
        # Too few new images to hold any out: the new statistics keep the previous calibration.
        thresholds = replace(base.thresholds, method="inherited")
        training = TrainingInfo(
            n_train=images_in(accumulator, config),
            training_set_sha256=training_set_digest([sha for _, sha in images]),
            training_images=images,
            calibration_images=list(base.training.calibration_images),
        )
        model = build_model(
            config, accumulator, weights_sha256=weights_sha256, training=training, thresholds=thresholds
        )
    else:
        raise PadimError("no normal images to calibrate the decision threshold on")
    check_skipped(n_listed, failed, settings.max_skipped_fraction)
    thresholds = model.thresholds
    if thresholds is None:
        raise PadimError("the model has no calibrated threshold")
    version = store.publish(product, lambda url: save_model(model, url), promote=promote)
    manifest = store.read_manifest(product, version)
    manifest.pop("files", None)
    manifest.pop("channel_indices", None)
    return PublishedModel(
        product=product,
        version=version,
        url=store.version_url(product, version),
        n_train=images_in(accumulator, config),
        n_calibration=thresholds.n_images,
        image_threshold=thresholds.image,
        pixel_threshold=thresholds.pixel,
        manifest=manifest,
        failed=failed,
    )


@dataclass
class CalibratedModel:
    """A model calibrated on held-out images.

    Attributes:
        model: The model to publish: the statistics of every image (the hold-out merged in when
            asked) with the thresholds.
        provisional: The model of the fitted images only, which scored the hold-out (same
            thresholds); ``model`` itself when the hold-out is not merged.
        calibration: The thresholds and the held-out scores, maps and outcomes.
    """

    model: PadimModel
    provisional: PadimModel
    calibration: Calibration


def calibrate_and_merge(
    config: PadimConfig,
    accumulator: GaussianAccumulator,
    weights_sha256: str,
    images: list[tuple[str, str]],
    holdout: Sequence[str],
    settings: TrainSettings,
    *,
    merge: bool = True,
) -> CalibratedModel:
    """Calibrate thresholds on held-out images, then add those images to the statistics.

    The held-out images are scored by the model of the other images (out-of-sample scores, the
    only honest basis for a threshold) through :func:`padim.engine.calibrate`, i.e. exactly as
    production scores; the same backbone pass folds them into ``accumulator``, and the published
    model is finalised from all images. Measured on both benchmark data sets, the merged model's
    false-positive rate on unseen normal images stays closer to the target than the model without
    them (BENCHMARKS.md), and no image is lost.

    Args:
        config: Model options.
        accumulator: Statistics of the fitted images; the held-out ones are merged into it.
        weights_sha256: Backbone weights identity.
        images: ``(uri, sha256)`` of the fitted images.
        holdout: Held-out normal image URIs.
        settings: Batch size, device, compute path and target rates.
        merge: Fold the held-out images into the statistics (training always does; evaluation
            may compare without).

    Returns:
        The final model (thresholds and provenance set), the provisional one and the calibration.

    Raises:
        PadimError: If no held-out image can be scored or the thresholds are degenerate.
        ImageReadError: Storage could not deliver a held-out image.
    """
    execution = {"path": settings.path, "runtime": settings.runtime, "precision": settings.precision}
    provisional = build_model(config, accumulator, weights_sha256=weights_sha256, keep_statistics=False, **execution)
    fitter = None
    if merge:
        fitter = PadimFitter(
            config,
            accumulator.device,
            accumulator=accumulator,
            projector=provisional.projector,
            reference=provisional.reference,
            **execution,
        )
    try:
        calibration = calibrate(
            provisional,
            list(holdout),
            image_fpr=settings.image_fpr,
            pixel_fpr=settings.pixel_fpr,
            batch_size=settings.batch_size,
            fold_into=fitter,
        )
    except ValueError as exc:
        raise PadimError(str(exc)) from exc
    thresholds = calibration.thresholds
    check_thresholds(thresholds.image, thresholds.pixel, len(calibration.scored))
    thresholds.method = "folder" if settings.calibration_url else "holdout"
    provisional.thresholds = thresholds
    if fitter is None:
        return CalibratedModel(model=provisional, provisional=provisional, calibration=calibration)
    fitter.flush()
    held_out = [(r.uri, r.sha256 or "") for r in calibration.scored]
    all_images = list(images) + held_out
    training = TrainingInfo(
        n_train=images_in(accumulator, config),
        training_set_sha256=training_set_digest([sha for _, sha in all_images]),
        training_images=all_images,
        calibration_images=held_out,
    )
    model = build_model(
        config, accumulator, weights_sha256=weights_sha256, training=training, thresholds=thresholds, **execution
    )
    return CalibratedModel(model=model, provisional=provisional, calibration=calibration)


def check_skipped(n_listed: int, failed: Sequence[tuple[str, str]], limit: float) -> None:
    """Refuse to publish a model when too many of the listed training images could not be used.

    Args:
        n_listed: Images the training looked at (fitted, held out and failed; images already in
            the model do not count).
        failed: ``(uri, reason)`` of the images that could not be used.
        limit: Largest allowed share (``TrainSettings.max_skipped_fraction``).

    Raises:
        PadimError: If the share of failed images exceeds ``limit``; the message gives the first
            reasons.
    """
    if not n_listed or len(failed) / n_listed <= limit:
        return
    reasons = "; ".join(f"{uri}: {reason}" for uri, reason in failed[:3])
    raise PadimError(
        f"{len(failed)} of {n_listed} training images ({len(failed) / n_listed:.0%}) could not be used, more than "
        f"the {limit:.0%} allowed (max_skipped_fraction); nothing was published. First reasons: {reasons}"
    )


def check_thresholds(image: float, pixel: float, n_images: int) -> None:
    """Refuse to publish a model whose calibrated thresholds cannot separate anything.

    Scores are distances (``>= 0``); a threshold of 0 means the held-out normal images scored
    exactly like the training images, which happens when the normal images do not vary at all
    (the same picture copied). Such a model would flag every image that differs in one pixel and
    cannot write report rows (``normalized_score = score / threshold``).

    Args:
        image: Calibrated image threshold.
        pixel: Calibrated pixel threshold.
        n_images: Held-out images it was calibrated on.

    Raises:
        PadimError: If a threshold is not a positive finite number.
    """
    for name, value in (("image", image), ("pixel", pixel)):
        if not math.isfinite(value) or value <= 0.0:
            raise PadimError(
                f"calibration on {n_images} held-out normal image(s) gave a {name} threshold of {value}: "
                "the normal images do not vary (identical copies?); train on varied images of good parts"
            )


def same_projection(stored: EmbeddingProjector, drawn: EmbeddingProjector) -> bool:
    """Whether a model's stored channel reduction equals the one this installation draws from its seed.

    Args:
        stored: The projector saved with the model.
        drawn: The projector :func:`padim.model.new_projector` builds now.

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


def failed_records(outcomes: Sequence[ShardOutcome]) -> list[ImageRecord]:
    """Skipped images of all shards, as records with reasons.

    Args:
        outcomes: Fit-task outcomes.

    Returns:
        One record per failed image.
    """
    return [ImageRecord(uri=uri, error=reason) for o in outcomes for uri, reason in o.failed]
