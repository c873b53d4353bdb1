"""Image-level detection metrics of an anomaly detector: AUROC, F1-max, ROC points, rates at a threshold.

They call scikit-learn directly; the pixel-level metrics, which pool every test pixel, are in
:mod:`padim.evaluation.pixel_metrics`.

Conventions:

* Decision rule: a sample is predicted anomalous when its score is **strictly greater** than the
  threshold (the rule of :class:`padim.core.model.Thresholds`). scikit-learn's curves use ``>=``; the
  thresholds reported here are converted so that ``score > threshold`` selects exactly the same
  samples (the midpoint between the curve's threshold and the next lower observed score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "F1Max",
    "RocPoints",
    "ThresholdRates",
    "f1_max",
    "image_auroc",
    "image_auroc_per_kind",
    "rates_at_threshold",
    "roc_points",
]


@dataclass(frozen=True)
class F1Max:
    """Best F1 score over all thresholds.

    Attributes:
        f1: The maximum F1.
        threshold: Threshold reaching it, for the rule ``score > threshold``.
        precision: Precision at that threshold.
        recall: Recall at that threshold.
    """

    f1: float
    threshold: float
    precision: float
    recall: float


@dataclass(frozen=True)
class ThresholdRates:
    """Confusion counts and rates of the rule ``score > threshold``.

    Attributes:
        threshold: The threshold applied.
        precision: ``tp / (tp + fp)``; 1.0 when nothing is predicted anomalous (no false alarm).
        recall: ``tp / (tp + fn)`` (NaN when there is no anomalous sample).
        fpr: ``fp / (fp + tn)`` (NaN when there is no normal sample).
        tp: True positives.
        fp: False positives.
        tn: True negatives.
        fn: False negatives.
    """

    threshold: float
    precision: float
    recall: float
    fpr: float
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall (0 when both are 0)."""
        total = 2 * self.tp + self.fp + self.fn
        return 2.0 * self.tp / total if total else 0.0


@dataclass(frozen=True)
class RocPoints:
    """Points of a ROC curve, threshold decreasing.

    Attributes:
        fpr: False-positive rates, shape ``(K,)``, non-decreasing from 0 to 1.
        tpr: True-positive rates, shape ``(K,)``.
        thresholds: Score thresholds (rule ``score >= threshold``, scikit-learn's), shape
            ``(K,)``; the first is ``+inf``.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


# --------------------------------------------------------------------------------------------
# Image level (scikit-learn)
# --------------------------------------------------------------------------------------------


def _binary_inputs(labels: ArrayLike, scores: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten ``labels`` (binarised with ``> 0``) and ``scores``."""
    y = np.asarray(labels).reshape(-1) > 0
    s = np.asarray(scores).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{what}: labels ({y.size} values) and scores ({s.size} values) differ in size")
    if y.size == 0:
        raise ValueError(f"{what}: no samples")
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"{what}: scores must be real numbers, got dtype {s.dtype}")
    if np.isnan(s).any():
        raise ValueError(f"{what}: scores contain NaN")
    return y, s


def _require_both_classes(y: np.ndarray, what: str) -> None:
    """Raise unless both normal and anomalous samples are present."""
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        kind = "anomalous" if positives == 0 else "normal"
        raise ValueError(f"{what} needs both normal and anomalous samples; there is no {kind} one")


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of image scores (``sklearn.metrics.roc_auc_score``).

    Args:
        labels: 1 (or any value > 0) for anomalous images, 0 for normal ones, shape ``(N,)``.
        scores: Image scores, shape ``(N,)``; higher means more anomalous.

    Returns:
        The AUROC in ``[0, 1]``.

    Raises:
        ValueError: If the sizes differ, a score is NaN or only one class is present.
    """
    y, s = _binary_inputs(labels, scores, "image AUROC")
    _require_both_classes(y, "image AUROC")
    return float(roc_auc_score(y, s))


def image_auroc_per_kind(kinds: Sequence[str], scores: ArrayLike, normal_kind: str = "good") -> dict[str, float]:
    """AUROC of each defect kind against the normal images.

    Args:
        kinds: Kind of every image (``"good"`` for normal ones), length ``N``.
        scores: Image scores, shape ``(N,)``.
        normal_kind: Name of the normal kind.

    Returns:
        ``{kind: AUROC of (normal images + images of that kind)}`` for every kind other than
        ``normal_kind``, in sorted order.

    Raises:
        ValueError: If the sizes differ or there is no normal image.
    """
    kind_array = np.asarray(list(kinds), dtype=object)
    s = np.asarray(scores).reshape(-1)
    if kind_array.shape != s.shape:
        raise ValueError(f"per-kind AUROC: {kind_array.size} kinds but {s.size} scores")
    normal = kind_array == normal_kind
    if not normal.any():
        raise ValueError(f"per-kind AUROC needs normal images (kind '{normal_kind}'); there is none")
    result: dict[str, float] = {}
    for kind in sorted(set(kind_array.tolist()) - {normal_kind}):
        subset = normal | (kind_array == kind)
        result[kind] = image_auroc(kind_array[subset] == kind, s[subset])
    return result


def roc_points(labels: ArrayLike, scores: ArrayLike) -> RocPoints:
    """ROC curve points (``sklearn.metrics.roc_curve``).

    Args:
        labels: Binary labels (``> 0`` is anomalous), shape ``(N,)``.
        scores: Scores, shape ``(N,)``.

    Returns:
        The curve.

    Raises:
        ValueError: If the sizes differ, a score is NaN or only one class is present.
    """
    y, s = _binary_inputs(labels, scores, "ROC curve")
    _require_both_classes(y, "ROC curve")
    fpr, tpr, thresholds = roc_curve(y, s)
    return RocPoints(fpr=fpr, tpr=tpr, thresholds=thresholds)


def _strict_threshold(inclusive: float, scores_sorted_desc: np.ndarray) -> float:
    """Convert a ``score >= t`` threshold into one for ``score > t`` selecting the same scores.

    Args:
        inclusive: A threshold equal to one of the scores.
        scores_sorted_desc: Every score, sorted in decreasing order.

    Returns:
        The midpoint between ``inclusive`` and the next lower score, or the next representable
        float below ``inclusive`` when no score is lower.
    """
    lower = scores_sorted_desc[scores_sorted_desc < inclusive]
    if lower.size == 0:
        return float(np.nextafter(np.float64(inclusive), -np.inf))
    below = float(lower[0])
    middle = below + (float(inclusive) - below) / 2.0
    # The midpoint of two adjacent floats can round onto either of them.
    return middle if below <= middle < inclusive else below


def f1_max(labels: ArrayLike, scores: ArrayLike) -> F1Max:
    """Maximum F1 over all thresholds (``sklearn.metrics.precision_recall_curve``).

    This is an *oracle* figure: the threshold is chosen with the test labels.

    Args:
        labels: Binary labels (``> 0`` is anomalous), shape ``(N,)``.
        scores: Scores, shape ``(N,)``.

    Returns:
        The best F1, its threshold (rule ``score > threshold``), precision and recall.

    Raises:
        ValueError: If the sizes differ, a score is NaN or there is no anomalous sample.
    """
    y, s = _binary_inputs(labels, scores, "F1-max")
    if not y.any():
        raise ValueError("F1-max needs at least one anomalous sample")
    precision, recall, thresholds = precision_recall_curve(y, s)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    threshold = _strict_threshold(float(thresholds[best]), np.sort(s)[::-1])
    return F1Max(f1=float(f1[best]), threshold=threshold, precision=float(precision[best]), recall=float(recall[best]))


def rates_at_threshold(labels: ArrayLike, scores: ArrayLike, threshold: float) -> ThresholdRates:
    """Precision, recall and false-positive rate of the rule ``score > threshold``.

    Args:
        labels: Binary labels (``> 0`` is anomalous), shape ``(N,)`` (or any shape, flattened).
        scores: Scores, same size.
        threshold: Decision threshold.

    Returns:
        Counts and rates; undefined rates are NaN (recall without anomalous samples, FPR without
        normal ones), precision is 1.0 when nothing is predicted anomalous.

    Raises:
        ValueError: If the sizes differ or a score is NaN.
    """
    y, s = _binary_inputs(labels, scores, "rates at a threshold")
    predicted = s > threshold
    tp = int(np.count_nonzero(predicted & y))
    fp = int(np.count_nonzero(predicted & ~y))
    fn = int(np.count_nonzero(y)) - tp
    tn = int(y.size - np.count_nonzero(y)) - fp
    return ThresholdRates(
        threshold=float(threshold),
        precision=tp / (tp + fp) if tp + fp else 1.0,
        recall=tp / (tp + fn) if tp + fn else float("nan"),
        fpr=fp / (fp + tn) if fp + tn else float("nan"),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
    )


# --------------------------------------------------------------------------------------------
# Pixel level (one exact sort shared by AUROC, F1-max and AUPRO)
# --------------------------------------------------------------------------------------------
