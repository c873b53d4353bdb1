"""Metrics of an evaluation run: :class:`EvaluationResult`, :func:`summarize` and :func:`write_json`.

:func:`summarize` computes the metrics of :mod:`padim.evaluation.metrics` from the raw arrays of an
:class:`padim.evaluation.run.EvaluationRun` (at the model's input resolution);
:meth:`EvaluationResult.to_dict` is the flat JSON object written by :func:`write_json`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from padim.core.config import PadimConfig
from padim.evaluation.metrics import (
    RocPoints,
    f1_max,
    image_auroc,
    image_auroc_per_kind,
    rates_at_threshold,
    roc_points,
)
from padim.evaluation.mvtec import NORMAL_KIND
from padim.evaluation.pixel_metrics import PixelCurve
from padim.evaluation.run import EvaluationRun

__all__ = ["AUPRO_FPR_LIMIT", "EvaluationResult", "summarize", "write_json"]

AUPRO_FPR_LIMIT = 0.3


@dataclass
class EvaluationResult:
    """Metrics of one evaluation; :meth:`to_dict` gives the flat JSON object.

    Oracle figures (``*_f1_max``, ``*_f1_threshold``, ``oracle_threshold``) choose their threshold
    with the test labels and are reported for comparison only; the label-free decision threshold
    is ``calibrated_threshold``. ``calibrated_*`` are ``None`` without a hold-out.

    Attributes:
        dataset: Data set URL.
        n_train: Training images in the final statistics' source (fit set plus hold-out).
        n_holdout: Held-out normal images used for calibration.
        n_test: Test images.
        n_test_anomalous: Defective test images.
        n_skipped: Training images that could not be decoded.
        image_auroc: Image-level AUROC.
        pixel_auroc: Pixel-level AUROC over all test pixels pooled.
        aupro: Normalised AUPRO up to FPR :data:`AUPRO_FPR_LIMIT`.
        image_f1_max: Oracle image F1-max.
        image_f1_threshold: Its threshold (``score > threshold``).
        pixel_f1_max: Oracle pixel F1-max.
        pixel_f1_threshold: Its threshold.
        oracle_threshold: Same as ``image_f1_threshold``: the test-label (oracle) image threshold.
        image_auroc_per_kind: Image AUROC of each defect kind against the good images.
        calibrated_threshold: Label-free image threshold from the hold-out.
        calibrated_image_fpr_target: Its target false-positive rate.
        calibrated_precision: Image precision of the calibrated threshold on the test set.
        calibrated_recall: Its image recall.
        calibrated_fpr: Its image false-positive rate on the good test images.
        calibrated_pixel_threshold: Label-free pixel threshold from the hold-out.
        calibrated_pixel_fpr_target: Its target false-positive rate.
        calibrated_pixel_precision: Pixel precision of the calibrated pixel threshold.
        calibrated_pixel_recall: Its pixel recall.
        calibrated_pixel_fpr: Its false-positive rate on the pixels of the good test images
            (the quantity the target rate controls).
        calibrated_pixel_fpr_all_normal: Its false-positive rate over all normal test pixels,
            including the defect-free parts of defective images (higher: the blurred map spreads
            around a defect).
        holdout_merged: Whether the hold-out was merged into the final statistics.
        fit_seconds: Fit wall time (decode included).
        score_seconds: Test-set scoring wall time (decode included).
        fit_images_per_s: ``n_train / fit_seconds``.
        score_images_per_s: ``n_test / score_seconds``.
        metrics_seconds: Wall time of computing the metrics.
        peak_rss_mb: Peak resident memory of fitting and scoring, MiB.
        device: Compute device.
        batch_size: Images per batch.
        config: The configuration evaluated.
        image_roc: Image ROC curve points (not part of the JSON).
        pixel_roc: Pixel ROC curve points, thinned (not part of the JSON).
    """

    dataset: str
    n_train: int
    n_holdout: int
    n_test: int
    n_test_anomalous: int
    n_skipped: int
    image_auroc: float
    pixel_auroc: float
    aupro: float
    image_f1_max: float
    image_f1_threshold: float
    pixel_f1_max: float
    pixel_f1_threshold: float
    oracle_threshold: float
    image_auroc_per_kind: dict[str, float]
    calibrated_threshold: float | None
    calibrated_image_fpr_target: float | None
    calibrated_precision: float | None
    calibrated_recall: float | None
    calibrated_fpr: float | None
    calibrated_pixel_threshold: float | None
    calibrated_pixel_fpr_target: float | None
    calibrated_pixel_precision: float | None
    calibrated_pixel_recall: float | None
    calibrated_pixel_fpr: float | None
    calibrated_pixel_fpr_all_normal: float | None
    holdout_merged: bool
    fit_seconds: float
    score_seconds: float
    fit_images_per_s: float
    score_images_per_s: float
    metrics_seconds: float
    peak_rss_mb: float
    device: str
    batch_size: int
    config: PadimConfig
    image_roc: RocPoints | None = field(default=None, repr=False)
    pixel_roc: RocPoints | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object: scalars only, per-kind AUROC as ``image_auroc_<kind>``,
        configuration as ``config_<field>``, ``aupro_fpr_limit`` recorded.

        Returns:
            ``{key: float | int | str | bool | None}``; non-finite floats become ``None``.
        """
        flat: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            if name in ("image_auroc_per_kind", "config", "image_roc", "pixel_roc"):
                continue
            flat[name] = _json_scalar(getattr(self, name))
        flat["aupro_fpr_limit"] = AUPRO_FPR_LIMIT
        for kind, value in sorted(self.image_auroc_per_kind.items()):
            key = f"image_auroc_{kind}"
            if key in flat:
                raise ValueError(f"defect kind '{kind}' collides with the metric '{key}'")
            flat[key] = _json_scalar(value)
        for name, value in self.config.model_dump().items():
            flat[f"config_{name}"] = _json_scalar(value)
        return flat


def _json_scalar(value: object) -> object:
    """A JSON-safe scalar: numpy numbers to Python, NaN/inf to ``None``."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fraction_above(values: np.ndarray, threshold: float) -> float | None:
    """Fraction of ``values`` strictly above ``threshold`` (``None`` when empty)."""
    return float(np.count_nonzero(values > threshold) / values.size) if values.size else None


def summarize(run: EvaluationRun) -> EvaluationResult:
    """Compute every metric of an evaluation run.

    Args:
        run: Output of :func:`padim.evaluation.run.run_evaluation`.

    Returns:
        The metrics.
    """
    start = time.perf_counter()
    labels = run.labels
    curve = PixelCurve.from_maps(run.masks, run.maps)
    image_best = f1_max(labels, run.scores)
    pixel_best = curve.f1_max()
    calibrated: dict[str, float | None] = dict.fromkeys(
        (
            "threshold",
            "image_fpr_target",
            "precision",
            "recall",
            "fpr",
            "pixel_threshold",
            "pixel_fpr_target",
            "pixel_precision",
            "pixel_recall",
            "pixel_fpr",
            "pixel_fpr_all_normal",
        ),
        None,
    )
    if run.thresholds is not None:
        image_rates = rates_at_threshold(labels, run.scores, run.thresholds.image)
        pixel_rates = rates_at_threshold(run.masks, run.maps, run.thresholds.pixel)
        calibrated.update(
            threshold=run.thresholds.image,
            image_fpr_target=run.thresholds.image_fpr,
            precision=image_rates.precision,
            recall=image_rates.recall,
            fpr=image_rates.fpr,
            pixel_threshold=run.thresholds.pixel,
            pixel_fpr_target=run.thresholds.pixel_fpr,
            pixel_precision=pixel_rates.precision,
            pixel_recall=pixel_rates.recall,
            pixel_fpr=_fraction_above(run.maps[~labels], run.thresholds.pixel),
            pixel_fpr_all_normal=pixel_rates.fpr,
        )
    result = EvaluationResult(
        dataset=run.dataset,
        n_train=run.n_train,
        n_holdout=int(run.holdout_scores.size),
        n_test=len(run.test),
        n_test_anomalous=int(labels.sum()),
        n_skipped=run.n_skipped,
        image_auroc=image_auroc(labels, run.scores),
        pixel_auroc=curve.auroc(),
        aupro=curve.aupro(AUPRO_FPR_LIMIT),
        image_f1_max=image_best.f1,
        image_f1_threshold=image_best.threshold,
        pixel_f1_max=pixel_best.f1,
        pixel_f1_threshold=pixel_best.threshold,
        oracle_threshold=image_best.threshold,
        image_auroc_per_kind=image_auroc_per_kind(run.kinds, run.scores, NORMAL_KIND),
        calibrated_threshold=calibrated["threshold"],
        calibrated_image_fpr_target=calibrated["image_fpr_target"],
        calibrated_precision=calibrated["precision"],
        calibrated_recall=calibrated["recall"],
        calibrated_fpr=calibrated["fpr"],
        calibrated_pixel_threshold=calibrated["pixel_threshold"],
        calibrated_pixel_fpr_target=calibrated["pixel_fpr_target"],
        calibrated_pixel_precision=calibrated["pixel_precision"],
        calibrated_pixel_recall=calibrated["pixel_recall"],
        calibrated_pixel_fpr=calibrated["pixel_fpr"],
        calibrated_pixel_fpr_all_normal=calibrated["pixel_fpr_all_normal"],
        holdout_merged=run.holdout_merged,
        fit_seconds=run.fit_seconds,
        score_seconds=run.score_seconds,
        fit_images_per_s=run.n_train / run.fit_seconds if run.fit_seconds > 0 else float("nan"),
        score_images_per_s=len(run.test) / run.score_seconds if run.score_seconds > 0 else float("nan"),
        metrics_seconds=0.0,
        peak_rss_mb=run.peak_rss_mb,
        device=run.device,
        batch_size=run.batch_size,
        config=run.config,
        image_roc=roc_points(labels, run.scores),
        pixel_roc=curve.roc(),
    )
    result.metrics_seconds = time.perf_counter() - start
    return result


def write_json(result: EvaluationResult, path: str | Path) -> None:
    """Write ``result.to_dict()`` as a JSON object (indented, keys in a stable order).

    Args:
        result: Metrics of an evaluation.
        path: Local output file (parent folders are created).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
