"""Detection and localisation metrics of an anomaly detector.

Image-level metrics (AUROC, F1-max, ROC points, rates at a threshold) call scikit-learn directly.

Pixel-level metrics are computed over *all* test pixels pooled together (29 M values for the
magnetic-tile test set at 224 x 224). scikit-learn needs about 30 s and 1.2 GB for one
``roc_auc_score`` at that size, and pixel AUROC, F1-max and AUPRO would each sort the pixels
again. :class:`PixelCurve` therefore sorts the pixels once and derives all three from the same
cumulative counts. It is exact (no histogram, no threshold subsampling): the curve has one point
per distinct anomaly-map value, the same points as ``sklearn.metrics.roc_curve(...,
drop_intermediate=False)``, and the tests check it against scikit-learn.

Conventions:

* Masks are binarised with ``> 0``.
* Decision rule: a sample is predicted anomalous when its score is **strictly greater** than the
  threshold (the rule of :class:`padim.model.Thresholds`). scikit-learn's curves use ``>=``; the
  thresholds reported here are converted so that ``score > threshold`` selects exactly the same
  samples (the midpoint between the curve's threshold and the next lower observed score).
* AUPRO follows the MVTec AD definition (Bergmann et al. 2021, also anomalib's ``AUPRO``): the
  ground-truth regions are the 8-connected components of every test mask; at each threshold the
  per-region overlap (fraction of the region's pixels above the threshold) is averaged over all
  regions of all images (PRO), and the false-positive rate is the fraction of all normal pixels of
  all test images above the threshold. The area under PRO-vs-FPR from 0 up to ``fpr_limit``
  (linear interpolation at the limit) is divided by ``fpr_limit``: a perfect detector scores 1,
  a constant (uninformative) one ``fpr_limit / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

__all__ = [
    "F1Max",
    "PixelCurve",
    "RocPoints",
    "ThresholdRates",
    "aupro",
    "f1_max",
    "image_auroc",
    "image_auroc_per_kind",
    "label_regions",
    "pixel_auroc",
    "rates_at_threshold",
    "roc_points",
]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


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


def label_regions(masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Number the 8-connected defect regions of every mask, uniquely across images.

    Args:
        masks: Ground-truth masks, shape ``(N, H, W)`` (or ``(H, W)``); ``> 0`` is defect.

    Returns:
        ``(region_ids, areas)``: ``region_ids`` has the masks' shape, dtype ``uint32``, 0 on
        normal pixels and ``1..K`` on the ``K`` regions; ``areas`` has shape ``(K + 1,)`` with
        ``areas[k]`` the pixel count of region ``k`` (``areas[0]`` counts normal pixels).
    """
    binary = np.asarray(masks) > 0
    if binary.ndim == 2:
        binary = binary[None]
    if binary.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W) or (H, W), got {binary.shape}")
    region_ids = np.zeros(binary.shape, dtype=np.uint32)
    offset = 0
    for index, mask in enumerate(binary):
        if not mask.any():
            continue
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        region_ids[index] = np.where(labelled > 0, labelled.astype(np.uint32) + offset, 0)
        offset += count
    areas = np.bincount(region_ids.reshape(-1), minlength=offset + 1).astype(np.int64)
    return region_ids.reshape(np.asarray(masks).shape), areas


def _float32_sort_keys(values: np.ndarray) -> np.ndarray:
    """Map float32 values to uint32 keys with the same order (``-0.0`` and ``0.0`` equal)."""
    bits = (values + np.float32(0.0)).view(np.uint32)  # -0.0 + 0.0 == +0.0
    negative = (bits >> np.uint32(31)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def _sort_descending(scores: np.ndarray, payload: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort scores in decreasing order, carrying a ``uint32`` payload along.

    float32 scores are packed with their payload into one ``uint64`` key (score bits high,
    payload low) and sorted by value, which is several times faster than ``argsort`` on tens of
    millions of pixels; other dtypes use a stable ``argsort``. Within equal scores the order is
    irrelevant to every caller (curves only take points between distinct scores).

    Args:
        scores: Shape ``(n,)``, real.
        payload: Shape ``(n,)``, ``uint32``.

    Returns:
        ``(scores, payload)`` sorted by decreasing score.
    """
    if scores.dtype == np.float32:
        keys = _float32_sort_keys(scores).astype(np.uint64) << np.uint64(32)
        keys |= payload.astype(np.uint64)
        keys.sort()
        keys = keys[::-1]
        sorted_payload = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        key_bits = (keys >> np.uint64(32)).astype(np.uint32)
        del keys
        negative = (key_bits & np.uint32(0x80000000)) == 0
        bits = np.where(negative, ~key_bits, key_bits & np.uint32(0x7FFFFFFF))
        return bits.view(np.float32), sorted_payload
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    return scores[order], payload[order]


@dataclass(frozen=True)
class PixelCurve:
    """Exact cumulative counts of pooled pixels at every distinct score, score decreasing.

    Element ``i`` of each array describes the rule ``score >= thresholds[i]``. Build it with
    :meth:`from_maps`.

    Attributes:
        thresholds: Distinct scores, decreasing, shape ``(K,)``.
        tp: Anomalous pixels at or above each threshold, shape ``(K,)``.
        fp: Normal pixels at or above each threshold, shape ``(K,)``.
        pro: Mean per-region overlap at each threshold, shape ``(K,)``.
        n_positive: Anomalous pixels in total.
        n_negative: Normal pixels in total.
        n_regions: Connected defect regions in total.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    pro: np.ndarray
    n_positive: int
    n_negative: int
    n_regions: int

    @classmethod
    def from_maps(cls, masks: ArrayLike, anomaly_maps: ArrayLike) -> PixelCurve:
        """Pool every pixel of every image and sort them once.

        Args:
            masks: Ground-truth masks, shape ``(N, H, W)``; ``> 0`` is defect.
            anomaly_maps: Anomaly maps, shape ``(N, H, W)`` (float32 keeps memory low: about
                40 bytes per pixel at the peak).

        Returns:
            The curve.

        Raises:
            ValueError: If the shapes differ, a score is NaN, or there are no normal or no
                anomalous pixels.
        """
        maps = np.asarray(anomaly_maps)
        mask_array = np.asarray(masks)
        if maps.shape != mask_array.shape:
            raise ValueError(f"anomaly maps {maps.shape} and masks {mask_array.shape} differ in shape")
        if maps.size == 0:
            raise ValueError("pixel metrics: no pixels")
        if not np.issubdtype(maps.dtype, np.floating):
            maps = maps.astype(np.float64)
        if np.isnan(maps).any():
            raise ValueError("pixel metrics: anomaly maps contain NaN")
        region_ids, areas = label_regions(mask_array)
        n_regions = areas.size - 1
        n_negative = int(areas[0])
        n_positive = int(maps.size - n_negative)
        if n_regions == 0:
            raise ValueError("pixel metrics need at least one defect pixel in the masks; there is none")
        if n_negative == 0:
            raise ValueError("pixel metrics need normal pixels; every pixel is marked as defect")
        scores, regions = _sort_descending(maps.reshape(-1), region_ids.reshape(-1))
        del region_ids
        last_of_run = np.flatnonzero(scores[1:] != scores[:-1])
        ends = np.append(last_of_run, scores.size - 1)
        positive = regions > 0
        tp = np.cumsum(positive, dtype=np.int64)[ends]
        fp = ends.astype(np.int64) + 1 - tp
        weights = np.zeros(areas.size, dtype=np.float64)
        weights[1:] = 1.0 / (areas[1:].astype(np.float64) * n_regions)
        pro = np.cumsum(weights[regions])[ends]
        return cls(
            thresholds=scores[ends].astype(np.float64),
            tp=tp,
            fp=fp,
            pro=np.minimum(pro, 1.0),
            n_positive=n_positive,
            n_negative=n_negative,
            n_regions=n_regions,
        )

    @property
    def fpr(self) -> np.ndarray:
        """False-positive rate at each threshold, shape ``(K,)``."""
        return self.fp / self.n_negative

    @property
    def tpr(self) -> np.ndarray:
        """True-positive rate at each threshold, shape ``(K,)``."""
        return self.tp / self.n_positive

    def auroc(self) -> float:
        """Pixel AUROC (trapezoid over every distinct threshold, as scikit-learn).

        Returns:
            The area under the ROC curve.
        """
        fpr = np.concatenate(([0.0], self.fpr))
        tpr = np.concatenate(([0.0], self.tpr))
        return float(np.trapezoid(tpr, fpr))

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Normalised area under the PRO-vs-FPR curve up to ``fpr_limit``.

        Args:
            fpr_limit: Upper integration limit on the false-positive rate, in ``(0, 1]``.

        Returns:
            ``area / fpr_limit`` in ``[0, 1]``.

        Raises:
            ValueError: If ``fpr_limit`` is outside ``(0, 1]``.
        """
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        fpr = np.concatenate(([0.0], self.fpr))
        pro = np.concatenate(([0.0], self.pro))
        inside = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[:inside] <= limit
        x, y = fpr[:inside], pro[:inside]
        if inside < fpr.size and x[-1] < fpr_limit:
            x0, x1, y0, y1 = fpr[inside - 1], fpr[inside], pro[inside - 1], pro[inside]
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x, y = np.append(x, fpr_limit), np.append(y, y_limit)
        return float(np.trapezoid(y, x) / fpr_limit)

    def f1_max(self) -> F1Max:
        """Maximum pixel F1 over all thresholds (oracle figure).

        Returns:
            The best F1, its threshold (rule ``score > threshold``), precision and recall.
        """
        predicted = self.tp + self.fp
        precision = self.tp / predicted
        recall = self.tpr
        f1 = 2.0 * self.tp / (predicted + self.n_positive)
        best = int(np.argmax(f1))
        inclusive = float(self.thresholds[best])
        if best + 1 < self.thresholds.size:
            below = float(self.thresholds[best + 1])
            middle = below + (inclusive - below) / 2.0
            threshold = middle if below <= middle < inclusive else below
        else:
            threshold = float(np.nextafter(np.float64(inclusive), -np.inf))
        return F1Max(
            f1=float(f1[best]), threshold=threshold, precision=float(precision[best]), recall=float(recall[best])
        )

    def roc(self, max_points: int | None = 2000) -> RocPoints:
        """ROC curve points, optionally thinned for plotting.

        Args:
            max_points: Keep at most about this many points (evenly spaced along the curve, the
                ends always kept); ``None`` keeps every distinct threshold.

        Returns:
            The curve, starting at ``(0, 0)`` with threshold ``+inf``.
        """
        fpr = np.concatenate(([0.0], self.fpr))
        tpr = np.concatenate(([0.0], self.tpr))
        thresholds = np.concatenate(([np.inf], self.thresholds))
        if max_points is not None and fpr.size > max_points:
            keep = np.unique(np.linspace(0, fpr.size - 1, max(2, max_points)).round().astype(np.int64))
            fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
        return RocPoints(fpr=fpr, tpr=tpr, thresholds=thresholds)


def pixel_auroc(masks: ArrayLike, anomaly_maps: ArrayLike) -> float:
    """Pixel AUROC over all pixels pooled (see :class:`PixelCurve`).

    Args:
        masks: Ground-truth masks, shape ``(N, H, W)``; ``> 0`` is defect.
        anomaly_maps: Anomaly maps, shape ``(N, H, W)``.

    Returns:
        The AUROC, equal to ``sklearn.metrics.roc_auc_score(masks.ravel() > 0, maps.ravel())``.
    """
    return PixelCurve.from_maps(masks, anomaly_maps).auroc()


def aupro(masks: ArrayLike, anomaly_maps: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    Args:
        masks: Ground-truth masks, shape ``(N, H, W)``; ``> 0`` is defect.
        anomaly_maps: Anomaly maps, shape ``(N, H, W)``.
        fpr_limit: Upper limit of the false-positive rate.

    Returns:
        AUPRO in ``[0, 1]``.
    """
    return PixelCurve.from_maps(masks, anomaly_maps).aupro(fpr_limit)
