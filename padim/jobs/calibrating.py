"""Calibrate a merged fit on held-out normal images, and refuse thresholds or fits that cannot be trusted.

:func:`calibrate_and_merge` finalises a provisional model from the merged statistics, scores the
held-out images with it through the engine (:func:`padim.jobs.engine.calibrate`: out-of-sample
scores set the thresholds), folds their embeddings into the statistics on the same pass and
builds the model of all images. The train flow (:func:`padim.jobs.training.finalize_and_publish`)
and ``padim evaluate`` (:mod:`padim.evaluation.run`) both call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from padim.core.config import PadimConfig
from padim.core.fitter import PadimFitter, build_model, images_in
from padim.core.model import PadimModel, TrainingInfo
from padim.core.statistics import GaussianAccumulator
from padim.errors import PadimError
from padim.io.artifact import training_set_digest
from padim.io.loading import load_reference
from padim.jobs.engine import Calibration, calibrate
from padim.settings import TrainSettings


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
    only honest basis for a threshold) through :func:`padim.jobs.engine.calibrate`, i.e. exactly as
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
    execution = settings.execution
    provisional = build_model(
        config,
        accumulator,
        weights_sha256=weights_sha256,
        keep_statistics=False,
        reference=load_reference(config),
        **execution,
    )
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
        config,
        accumulator,
        weights_sha256=weights_sha256,
        training=training,
        thresholds=thresholds,
        reference=provisional.reference,
        **execution,
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
