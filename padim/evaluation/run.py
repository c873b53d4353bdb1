"""Fit, calibrate and score an MVTec-layout data set exactly as the train and score flows do.

:func:`run_evaluation` runs what ``padim train`` and ``padim score`` run - the same hold-out split
(:func:`padim.jobs.training.plan_training`), the same fit (:func:`padim.jobs.engine.fit_images`), the
same calibration and merge (:func:`padim.jobs.calibrating.calibrate_and_merge`) and the same scoring
(:func:`padim.jobs.engine.score_images`), with the same defaults (:class:`padim.settings.TrainSettings`)
- and returns the raw arrays (scores, maps, masks, hold-out scores) as an :class:`EvaluationRun`, the
input of :func:`padim.evaluation.results.summarize` and of studies such as ``benchmarks/accuracy.py``.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from padim.core.alignment import with_reference
from padim.core.config import PadimConfig
from padim.core.execution import auto_batch_size
from padim.core.fitter import build_model
from padim.core.model import PadimModel, Thresholds
from padim.evaluation.mvtec import DatasetLayoutError, TestImage, discover_layout, load_mask
from padim.jobs.calibrating import calibrate_and_merge
from padim.jobs.engine import fit_images, score_images
from padim.jobs.training import plan_training
from padim.settings import TrainSettings

__all__ = ["EvaluationRun", "peak_rss_mb", "run_evaluation", "score_test_images"]

logger = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


@dataclass
class EvaluationRun:
    """Raw outcome of fitting, calibrating and scoring (input of :func:`padim.evaluation.results.summarize`).

    Attributes:
        dataset: Data set URL.
        config: Configuration evaluated.
        test: The test images scored, in the order of the arrays below.
        scores: Image scores, shape ``(N,)``.
        maps: Anomaly maps, shape ``(N, S, S)``, float32.
        masks: Ground-truth masks at the same resolution, shape ``(N, S, S)``, bool.
        thresholds: Thresholds calibrated on the hold-out, or ``None`` without a hold-out.
        holdout_scores: Image scores of the held-out normal images (fit-set model), ``(H,)``.
        holdout_maps: Their anomaly maps, shape ``(H, S, S)``.
        holdout_merged: Whether the hold-out was merged into the final statistics.
        unmerged_scores: Test image scores under the fit-set-only model, ``(N,)``, when
            requested (``compare_unmerged``); else ``None``.
        unmerged_good_maps: That model's maps of the good test images, ``(G, S, S)``, or ``None``.
        n_train: Training images decoded (fit set plus hold-out).
        n_fit: Images in the fit set.
        n_skipped: Training images that could not be decoded (skipped).
        fit_seconds: Wall time of fitting (decode, embed, calibrate, finalise).
        score_seconds: Wall time of scoring the test set (decode, embed, Mahalanobis, maps).
        peak_rss_mb: Peak resident memory after scoring, MiB.
        device: Compute device used.
        batch_size: Images per batch.
    """

    dataset: str
    config: PadimConfig
    test: list[TestImage]
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    thresholds: Thresholds | None
    holdout_scores: np.ndarray
    holdout_maps: np.ndarray
    holdout_merged: bool
    unmerged_scores: np.ndarray | None
    unmerged_good_maps: np.ndarray | None
    n_train: int
    n_fit: int
    n_skipped: int
    fit_seconds: float
    score_seconds: float
    peak_rss_mb: float
    device: str
    batch_size: int

    @property
    def labels(self) -> np.ndarray:
        """Image labels, shape ``(N,)``: True for defective images."""
        return np.array([image.anomalous for image in self.test], dtype=bool)

    @property
    def kinds(self) -> list[str]:
        """Kind of every test image, length ``N``."""
        return [image.kind for image in self.test]


def _fit_and_calibrate(
    train: list[str], config: PadimConfig, settings: TrainSettings, merge_holdout: bool
) -> tuple[PadimModel, PadimModel | None, Any, int, int]:
    """Fit and calibrate exactly as the train flow does (one shard: merging shards is exact).

    Returns:
        ``(model, provisional model or None, calibration or None, n_fit, n_skipped)``.
    """
    if settings.holdout_fraction > 0 or settings.calibration_url:
        plan = plan_training(train, settings)
        fit_uris, holdout = [uri for shard in plan.fit_shards for uri in shard], plan.holdout
    else:  # the paper protocol: every image fitted, nothing calibrated
        fit_uris, holdout = list(train), []
    config = with_reference(config, fit_uris[0] if fit_uris else None)
    fitted = fit_images(
        fit_uris,
        config,
        batch_size=settings.batch_size,
        device=settings.device,
        **settings.execution,
    )
    for record in fitted.failed:
        logger.warning("skipping training image %s: %s", record.uri, record.error)
    n_fit, n_skipped = len(fitted.fitted), len(fitted.failed)
    if not holdout:
        model = build_model(
            config,
            fitted.accumulator,
            weights_sha256=fitted.weights_sha256,
            keep_statistics=False,
            **settings.execution,
            reference=fitted.reference,
        )
        return model, None, None, n_fit, n_skipped
    images = [(r.uri, r.sha256 or "") for r in fitted.fitted]
    calibrated = calibrate_and_merge(
        config, fitted.accumulator, fitted.weights_sha256, images, holdout, settings, merge=merge_holdout
    )
    n_skipped += len(calibrated.calibration.failed)
    provisional = calibrated.provisional if calibrated.provisional is not calibrated.model else None
    return calibrated.model, provisional, calibrated.calibration, n_fit, n_skipped


def score_test_images(
    model: PadimModel, test: list[TestImage], settings: TrainSettings
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Score test images with :func:`padim.jobs.engine.score_images` (what production runs).

    Args:
        model: The model.
        test: The test images.
        settings: Batch size.

    Returns:
        ``(scores (N,) float32, maps (N, S, S) float32, original (width, height) of each image)``.

    Raises:
        DatasetLayoutError: If a test image cannot be scored.
    """
    side = model.config.input_size
    scores = np.empty(len(test), dtype=np.float32)
    maps = np.empty((len(test), side, side), dtype=np.float32)
    sizes: list[tuple[int, int]] = []
    uris = [image.uri for image in test]
    for row, result in enumerate(score_images(model, uris, batch_size=settings.batch_size, keep_maps="all")):
        if not result.ok or result.anomaly_map is None or result.score is None:
            raise DatasetLayoutError(f"cannot evaluate, test image failed: {result.record.uri}: {result.record.error}")
        scores[row], maps[row] = result.score, result.anomaly_map
        sizes.append((result.record.width or 0, result.record.height or 0))
    return scores, maps, sizes


def run_evaluation(
    dataset_dir: str | Path,
    config: PadimConfig | None = None,
    settings: TrainSettings | None = None,
    *,
    merge_holdout: bool = True,
    compare_unmerged: bool = False,
) -> EvaluationRun:
    """Fit with a calibration hold-out, calibrate, score the test set; keep the raw arrays.

    Args:
        dataset_dir: MVTec-layout data set (local folder or fsspec URL).
        config: Model options (default :class:`PadimConfig()`).
        settings: How to fit and calibrate (default :class:`TrainSettings()`, what ``padim train``
            uses): batch size, device, hold-out share (0 fits on every training image and
            calibrates nothing: the paper protocol), target rates, seed, compute path.
        merge_holdout: Merge the hold-out into the final statistics after calibrating (what
            training publishes).
        compare_unmerged: Also keep the test scores of the fit-set-only model (one more pass over
            the test images) to measure the effect of merging.

    Returns:
        The raw arrays and timings.

    Raises:
        DatasetLayoutError: If the data set is not in the MVTec layout or a test image or mask
            cannot be read.
        PadimError: If calibration fails (no held-out image could be scored, degenerate thresholds).
    """
    config = config or PadimConfig()
    settings = settings or TrainSettings()
    layout = discover_layout(dataset_dir)

    start = time.perf_counter()
    model, provisional, calibration, n_fit, n_skipped = _fit_and_calibrate(
        layout.train, config, settings, merge_holdout
    )
    fit_seconds = time.perf_counter() - start

    start = time.perf_counter()
    scores, maps, sizes = score_test_images(model, layout.test, settings)
    score_seconds = time.perf_counter() - start
    masks = np.stack([load_mask(image.mask_uri, size, config) for image, size in zip(layout.test, sizes, strict=True)])
    unmerged_scores = unmerged_good = None
    if compare_unmerged and provisional is not None:
        unmerged_scores, unmerged_maps, _ = score_test_images(provisional, layout.test, settings)
        good = np.array([not image.anomalous for image in layout.test], dtype=bool)
        unmerged_good = unmerged_maps[good]
    side = config.input_size
    return EvaluationRun(
        dataset=layout.root,
        config=config,
        test=layout.test,
        scores=scores,
        maps=maps,
        masks=masks,
        thresholds=calibration.thresholds if calibration is not None else None,
        holdout_scores=calibration.scores.astype(np.float32) if calibration is not None else np.zeros(0, np.float32),
        holdout_maps=calibration.maps if calibration is not None else np.zeros((0, side, side), np.float32),
        holdout_merged=calibration is not None and merge_holdout,
        unmerged_scores=unmerged_scores,
        unmerged_good_maps=unmerged_good,
        n_train=n_fit + (len(calibration.scored) if calibration is not None else 0),
        n_fit=n_fit,
        n_skipped=n_skipped,
        fit_seconds=fit_seconds,
        score_seconds=score_seconds,
        peak_rss_mb=peak_rss_mb(),
        device=str(model.mean.device),
        batch_size=settings.batch_size or auto_batch_size(config, model.mean.device),
    )
