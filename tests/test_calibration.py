"""Tests of padim.core.calibration: thresholds from normal scores and the hold-out split."""

from __future__ import annotations

import numpy as np
import pytest

from padim.core.calibration import (
    DEFAULT_IMAGE_FPR,
    DEFAULT_PIXEL_FPR,
    calibrate_thresholds,
    split_holdout,
    threshold_at_fpr,
)
from padim.core.model import Thresholds


def _fpr(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores > threshold))


# ---------------------------------------------------------------- threshold_at_fpr


def test_threshold_is_the_order_statistic() -> None:
    scores = np.arange(1, 101, dtype=np.float64)  # 1..100
    # 1% of 100 scores may lie above: s_(99) = 99, and exactly one score (100) is above it.
    assert threshold_at_fpr(scores, 0.01) == 99.0
    assert threshold_at_fpr(scores, 0.05) == 95.0
    assert threshold_at_fpr(scores, 0.0) == 100.0
    # 0.5% of 100 = 0.5 scores: none may lie above, so the maximum.
    assert threshold_at_fpr(scores, 0.005) == 100.0


def test_threshold_is_the_smallest_meeting_the_target() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=537)
    for fpr in (0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.9):
        t = threshold_at_fpr(scores, fpr)
        assert _fpr(scores, t) <= fpr + 1e-12
        lower = np.nextafter(t, -np.inf)
        assert _fpr(scores, lower) > fpr  # any smaller threshold breaks the target


def test_threshold_with_few_scores_is_the_maximum() -> None:
    scores = [0.3, 0.9, 0.1, 0.5]
    assert threshold_at_fpr(scores, 0.01) == 0.9
    assert threshold_at_fpr(scores, 0.24) == 0.9  # 0.96 of a score: still none allowed above
    assert threshold_at_fpr(scores, 0.25) == 0.5  # one of four allowed above


def test_threshold_with_ties_keeps_them_normal() -> None:
    scores = [1.0, 2.0, 2.0, 2.0, 2.0]
    t = threshold_at_fpr(scores, 0.2)  # one score may lie above; the top is a 4-way tie
    assert t == 2.0
    assert _fpr(np.asarray(scores), t) == 0.0


def test_threshold_float_rounding_of_the_target() -> None:
    # 100 * (1 - 0.01) is 99.00000000000001 in floating point; the rule must still allow one.
    scores = np.arange(100, dtype=np.float64)
    assert threshold_at_fpr(scores, 0.01) == 98.0
    assert threshold_at_fpr(scores, 0.07) == 92.0


def test_threshold_margin_in_standard_deviations() -> None:
    scores = np.array([0.0, 2.0, 4.0, 6.0])
    std = float(np.std(scores))
    assert threshold_at_fpr(scores, 0.0, margin=0.5) == pytest.approx(6.0 + 0.5 * std)
    with pytest.raises(ValueError, match="margin"):
        threshold_at_fpr(scores, 0.0, margin=-1.0)


@pytest.mark.parametrize("fpr", [-0.1, 1.0, 1.5, float("nan")])
def test_threshold_rejects_bad_targets(fpr: float) -> None:
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr([1.0, 2.0], fpr)


def test_threshold_rejects_empty_and_non_finite() -> None:
    with pytest.raises(ValueError, match="at least one"):
        threshold_at_fpr([], 0.01)
    with pytest.raises(ValueError, match="NaN or infinite"):
        threshold_at_fpr([1.0, float("inf")], 0.01)


# ---------------------------------------------------------------- calibrate_thresholds


def test_calibrate_thresholds_image_and_pixel() -> None:
    rng = np.random.default_rng(1)
    image_scores = rng.normal(10.0, 1.0, size=200)
    maps = rng.normal(3.0, 1.0, size=(200, 8, 8)).astype(np.float32)
    thresholds = calibrate_thresholds(image_scores, maps, image_fpr=0.01, pixel_fpr=0.001)
    assert isinstance(thresholds, Thresholds)
    assert thresholds.image == threshold_at_fpr(image_scores, 0.01)
    assert thresholds.pixel == threshold_at_fpr(maps, 0.001)
    assert _fpr(image_scores, thresholds.image) <= 0.01
    assert _fpr(maps, thresholds.pixel) <= 0.001
    assert (thresholds.image_fpr, thresholds.pixel_fpr, thresholds.n_images) == (0.01, 0.001, 200)
    assert thresholds.method == "holdout"
    assert thresholds.normal_median == pytest.approx(float(np.median(image_scores)))


def test_calibrate_thresholds_defaults_and_validation() -> None:
    thresholds = calibrate_thresholds([1.0, 2.0], np.zeros((2, 4, 4)), method="folder")
    assert thresholds.image_fpr == DEFAULT_IMAGE_FPR and thresholds.pixel_fpr == DEFAULT_PIXEL_FPR
    assert thresholds.method == "folder"
    with pytest.raises(ValueError, match="one anomaly map per image"):
        calibrate_thresholds([1.0, 2.0, 3.0], np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="at least one"):
        calibrate_thresholds([], np.zeros((0, 4, 4)))
    with pytest.raises(ValueError, match="pixel_fpr"):
        calibrate_thresholds([1.0], np.zeros((1, 4, 4)), pixel_fpr=1.0)


# ---------------------------------------------------------------- split_holdout


def test_split_holdout_sizes_and_partition() -> None:
    items = [f"/data/train/good/{i:03d}.png" for i in range(100)]
    split = split_holdout(items, fraction=0.2, min_holdout=10, seed=0)
    assert len(split.holdout) == 20 and len(split.fit) == 80
    assert sorted(split.fit + split.holdout) == sorted(items)
    assert split.fit == [item for item in items if item in set(split.fit)]  # input order kept
    small = split_holdout(items[:30], fraction=0.2, min_holdout=10)
    assert len(small.holdout) == 10  # the minimum wins over 6
    assert split_holdout(items, fraction=0.0).holdout == []


def test_split_holdout_is_deterministic_and_order_independent() -> None:
    items = [f"img_{i}" for i in range(50)]
    first = split_holdout(items, 0.2, 5, seed=3)
    shuffled = list(reversed(items))
    second = split_holdout(shuffled, 0.2, 5, seed=3)
    assert sorted(first.holdout) == sorted(second.holdout)
    other_seed = split_holdout(items, 0.2, 5, seed=4)
    assert sorted(other_seed.holdout) != sorted(first.holdout)
    # The hold-out is not simply the first or last items in sorted order.
    assert sorted(first.holdout) != sorted(items)[:10] and sorted(first.holdout) != sorted(items)[-10:]


def test_split_holdout_is_stable_when_images_are_added() -> None:
    items = [f"img_{i}" for i in range(40)]
    before = set(split_holdout(items, 0.25, 1, seed=0).holdout)
    after = set(split_holdout([*items, "img_new_a", "img_new_b"], 0.25, 1, seed=0).holdout)
    # ceil(0.25 * 42) = 11 held out instead of 10: the old hold-out stays apart from one possible swap.
    assert len(before & after) >= len(before) - 1


def test_split_holdout_uses_the_key() -> None:
    records = [("a.png", "hash-1"), ("b.png", "hash-2"), ("c.png", "hash-3"), ("d.png", "hash-4")]
    by_hash = split_holdout(records, 0.25, 1, key=lambda r: r[1])
    renamed = [(f"renamed_{name}", digest) for name, digest in records]
    by_hash_renamed = split_holdout(renamed, 0.25, 1, key=lambda r: r[1])
    assert [r[1] for r in by_hash.holdout] == [r[1] for r in by_hash_renamed.holdout]


def test_split_holdout_validation() -> None:
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(["a", "b", "c"], fraction=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        split_holdout(["a", "b", "c"], fraction=0.5, min_holdout=2)
    with pytest.raises(ValueError, match="not unique"):
        split_holdout(["a", "a", "b", "c"], fraction=0.25, min_holdout=1)
    with pytest.raises(ValueError, match="min_holdout"):
        split_holdout(["a", "b", "c"], fraction=0.2, min_holdout=-1)
