"""Decision thresholds from normal images only (no defect labels, no test set).

Training holds out part of its normal images (:func:`split_holdout`), fits the statistics on the
rest, scores the held-out images with that model, and sets the thresholds at a target
false-positive rate on them (:func:`calibrate_thresholds`). The held-out images are then merged
into the final statistics (accumulators merge exactly), so no training data is lost; the
measurements behind that choice and behind the default pixel target are in
``BENCHMARKS.md``.

Threshold rule (:func:`threshold_at_fpr`): an image (pixel) is anomalous when its score is
**strictly greater** than the threshold. The threshold is the smallest value whose false-positive
rate on the normal scores is at most the target, i.e. the order statistic ``s_(n - m)`` of the
``n`` sorted normal scores, with ``m = floor(fpr * n)`` normal scores allowed above it. With
fewer than ``1 / fpr`` scores ``m`` is 0 and the threshold is the largest normal score; an optional
margin (in standard deviations of the normal scores) moves it further up.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from numpy.typing import ArrayLike

from padim.core.model import Thresholds
from padim.settings import TrainSettings, default_of

__all__ = [
    "DEFAULT_IMAGE_FPR",
    "DEFAULT_PIXEL_FPR",
    "HoldoutSplit",
    "calibrate_thresholds",
    "split_holdout",
    "threshold_at_fpr",
]

T = TypeVar("T")

DEFAULT_IMAGE_FPR: float = default_of(TrainSettings, "image_fpr")
"""Target image false-positive rate (:class:`~padim.settings.TrainSettings`): 1 normal image in 100 flagged."""

DEFAULT_PIXEL_FPR: float = default_of(TrainSettings, "pixel_fpr")
"""Target pixel false-positive rate (0.1% of normal pixels above the pixel threshold).

Chosen by measurement (``BENCHMARKS.md``): at 0.1% the pixel F1 of the calibrated
threshold is within 0.01-0.04 of the oracle F1-max on bottle and magnetic tile; 1% outlines far too
much (bottle precision 0.27-0.41) and 0.01% misses most of each defect (recall 0.11-0.41).
"""

_FPR_TOLERANCE = 1e-9


@dataclass(frozen=True)
class HoldoutSplit(Generic[T]):
    """Normal images split into the fitting set and the calibration hold-out.

    Attributes:
        fit: Items whose embeddings are accumulated first (input order kept).
        holdout: Items scored by the model of ``fit`` to set the thresholds (input order kept).
    """

    fit: list[T]
    holdout: list[T]


def _check_fpr(fpr: float, what: str) -> None:
    """Raise unless ``0 <= fpr < 1``."""
    if not (isinstance(fpr, (int, float)) and 0.0 <= fpr < 1.0) or math.isnan(fpr):
        raise ValueError(f"{what} must be in [0, 1), got {fpr!r}")


def threshold_at_fpr(normal_scores: ArrayLike, fpr: float, margin: float = 0.0) -> float:
    """Smallest threshold whose false-positive rate on normal scores is at most ``fpr``.

    With the rule ``anomalous = score > threshold`` and ``n`` normal scores sorted increasingly
    ``s_(1) <= ... <= s_(n)``, at most ``m = floor(fpr * n)`` of them may lie above the
    threshold, which gives ``s_(n - m)`` (ties included: every score equal to it is normal).
    When ``n < 1 / fpr`` this is the largest normal score.

    Args:
        normal_scores: Scores of normal samples only, any shape (flattened), at least one.
        fpr: Target false-positive rate in ``[0, 1)``; 0 gives the maximum.
        margin: Safety margin added, in units of the normal scores' standard deviation
            (``>= 0``; 0 is the plain order statistic). Useful when few images are held out.

    Returns:
        The threshold.

    Raises:
        ValueError: If there are no scores, a score is not finite, ``fpr`` is outside ``[0, 1)``
            or ``margin`` is negative.
    """
    _check_fpr(fpr, "fpr")
    if not (margin >= 0.0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    scores = np.asarray(normal_scores).reshape(-1)
    if scores.size == 0:
        raise ValueError("threshold_at_fpr needs at least one normal score")
    if not np.isfinite(scores).all():
        raise ValueError("normal scores contain NaN or infinite values")
    n = scores.size
    allowed = math.floor(fpr * n + _FPR_TOLERANCE)
    k = n - 1 - allowed  # 0-based index of s_(n - m)
    threshold = float(np.partition(scores, k)[k])
    if margin:
        threshold += margin * float(np.std(scores, dtype=np.float64))
    return threshold


def calibrate_thresholds(
    image_scores: ArrayLike,
    pixel_values: ArrayLike,
    image_fpr: float = DEFAULT_IMAGE_FPR,
    pixel_fpr: float = DEFAULT_PIXEL_FPR,
    margin: float = 0.0,
    method: str = "holdout",
) -> Thresholds:
    """Image and pixel thresholds from the scores of held-out normal images.

    Args:
        image_scores: Image scores of the held-out normal images, shape ``(N,)``.
        pixel_values: Their anomaly maps, shape ``(N, H, W)`` (every pixel is normal).
        image_fpr: Target fraction of normal images flagged.
        pixel_fpr: Target fraction of normal pixels above the pixel threshold.
        margin: Safety margin of both thresholds, see :func:`threshold_at_fpr`.
        method: Where the normal images came from (``"holdout"``, ``"folder"``), recorded.

    Returns:
        The thresholds, with the targets, the number of images used and their median image score
        (``normal_median``, the reference of the nightly drift check).

    Raises:
        ValueError: If there is no image, the maps do not belong to the images, or a target
            rate is outside ``[0, 1)``.
    """
    scores = np.asarray(image_scores).reshape(-1)
    pixels = np.asarray(pixel_values)
    if scores.size == 0:
        raise ValueError("calibration needs at least one held-out normal image")
    if pixels.ndim < 1 or pixels.shape[0] != scores.size:
        raise ValueError(
            f"pixel_values must hold one anomaly map per image: {scores.size} image scores but "
            f"pixel_values of shape {pixels.shape}"
        )
    _check_fpr(image_fpr, "image_fpr")
    _check_fpr(pixel_fpr, "pixel_fpr")
    return Thresholds(
        image=threshold_at_fpr(scores, image_fpr, margin),
        pixel=threshold_at_fpr(pixels, pixel_fpr, margin),
        image_fpr=float(image_fpr),
        pixel_fpr=float(pixel_fpr),
        n_images=int(scores.size),
        method=method,
        normal_median=float(np.median(scores)),
    )


def _holdout_count(n: int, fraction: float, min_holdout: int) -> int:
    """Number of items held out; raises when too few would remain for fitting."""
    if not (0.0 <= fraction < 1.0) or math.isnan(fraction):
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction!r}")
    if min_holdout < 0:
        raise ValueError(f"min_holdout must be >= 0, got {min_holdout}")
    if fraction == 0.0:
        return 0
    count = max(min_holdout, math.ceil(fraction * n - _FPR_TOLERANCE), 1)
    if n - count < 2:
        raise ValueError(
            f"cannot hold out {count} of {n} normal images for calibration and still fit on at least 2; "
            "add normal images, lower the holdout fraction / min_holdout, or pass a separate calibration folder"
        )
    return count


def _rank_key(item: object, key: Callable[[object], str], seed: int) -> str:
    """Seeded hash of an item's identity: a deterministic pseudo-random rank."""
    return hashlib.sha256(f"{seed}\x00{key(item)}".encode()).hexdigest()


def split_holdout(
    items: Sequence[T],
    fraction: float = 0.2,
    min_holdout: int = 10,
    seed: int = 0,
    key: Callable[[T], str] = str,
) -> HoldoutSplit[T]:
    """Deterministically split normal images into a fitting set and a calibration hold-out.

    Every item is ranked by ``sha256(seed, key(item))`` and the lowest-ranked ones are held out.
    The split therefore depends only on the set of items (not on their order), is the same in
    every process, and an item's rank does not change when others are added. Pass the content
    hash as ``key`` to make it independent of file names too.

    Args:
        items: The normal images (URIs, records...), at least 3 when holding out.
        fraction: Fraction to hold out, in ``[0, 1)``; 0 holds out nothing.
        min_holdout: Hold out at least this many (when ``fraction > 0``).
        seed: Seed of the ranking.
        key: Identity of an item (default ``str``); must be unique per item.

    Returns:
        The split; both lists keep the input order.

    Raises:
        ValueError: If ``fraction`` or ``min_holdout`` is invalid, keys are not unique, or fewer
            than 2 items would remain for fitting.
    """
    count = _holdout_count(len(items), fraction, min_holdout)
    keys = [key(item) for item in items]
    if len(set(keys)) != len(keys):
        raise ValueError("split_holdout: item keys are not unique (the same image listed twice?)")
    ranks = sorted(range(len(items)), key=lambda i: _rank_key(items[i], key, seed))  # type: ignore[arg-type]
    held = set(ranks[:count])
    return HoldoutSplit(
        fit=[item for i, item in enumerate(items) if i not in held],
        holdout=[item for i, item in enumerate(items) if i in held],
    )
