"""Tests of padim.evaluation.metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from padim.evaluation.metrics import f1_max, image_auroc, image_auroc_per_kind, rates_at_threshold, roc_points
from padim.evaluation.pixel_metrics import PixelCurve, aupro, label_regions, pixel_auroc


def _random_pixels(seed: int = 0, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Masks (4, 24, 24) with three regions and noisy maps where defects score higher, with ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 24, 24), dtype=np.uint8)
    masks[0, 2:8, 3:9] = 255
    masks[1, 15:22, 1:4] = 1
    masks[1, 1:4, 18:23] = 7
    maps = rng.random(masks.shape) + 0.6 * (masks > 0)
    maps[2] = np.round(maps[2], 1)  # many ties
    return masks, maps.astype(dtype)


def _sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    return float(np.max(np.where(denominator > 0, 2 * precision * recall / np.maximum(denominator, 1e-300), 0)))


# ---------------------------------------------------------------- image level


def test_image_auroc_matches_sklearn_and_binarises_labels() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 50)
    scores = rng.normal(size=50) + labels
    assert image_auroc(labels * 255, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-15)


def test_image_auroc_rejects_one_class_and_nan() -> None:
    with pytest.raises(ValueError, match="no anomalous"):
        image_auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="differ in size"):
        image_auroc([0, 1, 1], [0.1, 0.2])


def test_image_auroc_per_kind_uses_good_plus_that_kind() -> None:
    kinds = ["good", "good", "crack", "crack", "hole", "hole"]
    scores = [0.1, 0.5, 0.9, 0.2, 0.6, 0.7]
    per_kind = image_auroc_per_kind(kinds, scores)
    assert list(per_kind) == ["crack", "hole"]
    # crack: positives {0.9, 0.2} vs normals {0.1, 0.5}: pairs won 0.9>0.1, 0.9>0.5, 0.2>0.1 -> 3/4
    assert per_kind["crack"] == pytest.approx(0.75)
    assert per_kind["hole"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="normal images"):
        image_auroc_per_kind(["crack", "hole"], [0.1, 0.2])


def test_f1_max_matches_sklearn_and_threshold_uses_strict_rule() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 80)
    scores = np.round(rng.normal(size=80) + 1.2 * labels, 1)  # ties
    best = f1_max(labels, scores)
    assert best.f1 == pytest.approx(_sklearn_f1_max(labels, scores), abs=1e-12)
    rates = rates_at_threshold(labels, scores, best.threshold)
    assert rates.f1 == pytest.approx(best.f1, abs=1e-12)
    assert rates.precision == pytest.approx(best.precision)
    assert rates.recall == pytest.approx(best.recall)


def test_f1_max_hand_case() -> None:
    # scores 0.9(+) 0.8(-) 0.7(+) 0.1(-): best F1 at threshold between 0.7 and 0.1: P=2/3, R=1 -> 0.8
    best = f1_max([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
    assert best.f1 == pytest.approx(0.8)
    assert 0.1 <= best.threshold < 0.7
    assert best.threshold == pytest.approx(0.4)


def test_rates_at_threshold_hand_case() -> None:
    rates = rates_at_threshold([0, 0, 0, 1, 1], [0.1, 0.5, 0.6, 0.5, 0.9], threshold=0.5)
    # predicted (> 0.5): 0.6 (normal), 0.9 (anomalous); 0.5 is not above the threshold
    assert (rates.tp, rates.fp, rates.tn, rates.fn) == (1, 1, 2, 1)
    assert rates.precision == pytest.approx(0.5)
    assert rates.recall == pytest.approx(0.5)
    assert rates.fpr == pytest.approx(1 / 3)
    nothing = rates_at_threshold([0, 1], [0.1, 0.2], threshold=1.0)
    assert nothing.precision == 1.0 and nothing.recall == 0.0 and nothing.fpr == 0.0


def test_roc_points_are_sklearns() -> None:
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    points = roc_points(labels, scores)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    np.testing.assert_array_equal(points.fpr, fpr)
    np.testing.assert_array_equal(points.tpr, tpr)
    np.testing.assert_array_equal(points.thresholds, thresholds)


# ---------------------------------------------------------------- regions


def test_label_regions_is_eight_connected_and_unique_across_images() -> None:
    masks = np.zeros((2, 5, 5), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = 255  # diagonal neighbours: one region
    masks[0, 4, 4] = 1  # a second region
    masks[1, 2, 2:4] = 3  # third region, in another image
    ids, areas = label_regions(masks)
    assert ids.dtype == np.uint32
    assert ids[0, 0, 0] == ids[0, 1, 1] != ids[0, 4, 4]
    assert set(np.unique(ids).tolist()) == {0, 1, 2, 3}
    assert ids[1, 2, 2] == ids[1, 2, 3] == 3
    np.testing.assert_array_equal(areas, [50 - 5, 2, 1, 2])


# ---------------------------------------------------------------- pixel level


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_matches_sklearn(dtype: type) -> None:
    masks, maps = _random_pixels(dtype=dtype)
    expected = roc_auc_score(masks.ravel() > 0, maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks, -maps) == pytest.approx(1.0 - expected, abs=1e-12)


def test_float32_sort_handles_negative_values_and_signed_zero() -> None:
    masks = np.array([[[0, 0, 1, 0, 1, 0, 1]]], dtype=np.uint8)
    maps = np.array([[[-2.5, -0.0, 0.0, 3.0, -1.0, 0.0, 1e-30]]], dtype=np.float32)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-15)
    curve = PixelCurve.from_maps(masks, maps)
    assert np.all(np.diff(curve.thresholds) < 0)  # distinct and decreasing: -0.0 and 0.0 merged
    assert curve.thresholds.size == 5


def test_pixel_curve_points_are_sklearns_roc_curve() -> None:
    masks, maps = _random_pixels(seed=3)
    curve = PixelCurve.from_maps(masks, maps)
    fpr, tpr, thresholds = roc_curve(masks.ravel() > 0, maps.ravel(), drop_intermediate=False)
    points = curve.roc(max_points=None)
    np.testing.assert_allclose(points.fpr, fpr, atol=1e-15)
    np.testing.assert_allclose(points.tpr, tpr, atol=1e-15)
    np.testing.assert_array_equal(points.thresholds[1:], thresholds[1:])
    thinned = curve.roc(max_points=50)
    assert thinned.fpr.size <= 50 and thinned.fpr[0] == 0.0 and thinned.fpr[-1] == 1.0


def test_pixel_f1_max_matches_sklearn() -> None:
    masks, maps = _random_pixels(seed=4)
    best = PixelCurve.from_maps(masks, maps).f1_max()
    assert best.f1 == pytest.approx(_sklearn_f1_max(masks.ravel() > 0, maps.ravel()), abs=1e-12)
    assert rates_at_threshold(masks, maps, best.threshold).f1 == pytest.approx(best.f1, abs=1e-12)


def test_aupro_hand_computed_two_regions() -> None:
    """Two regions, two images; the PRO curve is worked out by hand.

    Image 0 (3 x 6), region A = two pixels of row 0, region B = three pixels of row 2 (row 1
    separates them, so they are two 8-connected components)::

        mask    A A . . . .      scores  9 3 0 0 0 5
                . . . . . .              0 0 0 0 0 0
                . . B B B .              0 0 8 7 2 0

    Image 1 (3 x 6): all normal, scores 6 4 1 1 1 1 in row 0, zeros elsewhere.
    Normal pixels: 13 + 18 = 31 with scores {6, 5, 4, 1, 1, 1, 1} and 24 zeros.

    Thresholds (score >= t), FPR = normal pixels at or above t / 31, PRO = mean(overlap A, B):
        t=9: A 1/2, B 0   -> PRO 1/4,  FPR 0
        t=8: B 1/3        -> PRO 5/12, FPR 0
        t=7: B 2/3        -> PRO 7/12, FPR 0
        t=6, 5, 4:           PRO 7/12, FPR 1/31, 2/31, 3/31
        t=3: A 1          -> PRO 5/6,  FPR 3/31
        t=2: B 1          -> PRO 1,    FPR 3/31
        t=1:                 PRO 1,    FPR 7/31;  t=0: FPR 1
    Area up to FPR 0.3: 7/12 * 3/31 + 1 * (0.3 - 3/31), divided by 0.3.
    """
    masks = np.zeros((2, 3, 6), dtype=np.uint8)
    masks[0, 0, 0:2] = 255
    masks[0, 2, 2:5] = 255
    maps = np.zeros((2, 3, 6), dtype=np.float32)
    maps[0, 0] = [9, 3, 0, 0, 0, 5]
    maps[0, 2] = [0, 0, 8, 7, 2, 0]
    maps[1, 0] = [6, 4, 1, 1, 1, 1]
    curve = PixelCurve.from_maps(masks, maps)
    assert (curve.n_regions, curve.n_negative, curve.n_positive) == (2, 31, 5)
    np.testing.assert_allclose(curve.thresholds, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    np.testing.assert_allclose(curve.pro, [1 / 4, 5 / 12, 7 / 12, 7 / 12, 7 / 12, 7 / 12, 5 / 6, 1, 1, 1])
    np.testing.assert_allclose(curve.fpr, np.array([0, 0, 0, 1, 2, 3, 3, 3, 7, 31]) / 31)
    expected = (7 / 12 * 3 / 31 + 1.0 * (0.3 - 3 / 31)) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(1 - 5 / 37.2, abs=1e-12)  # = 0.86559...
    # A limit inside the first flat stretch: the normalised area is that stretch's PRO.
    assert curve.aupro(fpr_limit=2 / 31) == pytest.approx(7 / 12, abs=1e-12)


def test_aupro_interpolates_at_the_limit() -> None:
    """One region of one pixel; its score is below half the normal pixels.

    Image (1 x 4): defect pixel score 2, normal pixels 3, 1, 0. Curve points (FPR, PRO):
    (0, 0) -> t=3: (1/3, 0) -> t=2: (1/3, 1) -> t=1: (2/3, 1) -> t=0: (1, 1).
    Limit 0.2 lies on the first segment (PRO 0): AUPRO 0. Limit 0.5: area = (0.5 - 1/3) * 1.
    """
    masks = np.array([[[1, 0, 0, 0]]])
    maps = np.array([[[2.0, 3.0, 1.0, 0.0]]])
    assert aupro(masks, maps, fpr_limit=0.2) == pytest.approx(0.0)
    assert aupro(masks, maps, fpr_limit=0.5) == pytest.approx((0.5 - 1 / 3) / 0.5)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(2 / 3)


def test_aupro_interpolates_on_a_sloped_segment() -> None:
    """A tie between the defect pixel and a normal one: the curve jumps (0, 0) -> (1/3, 1).

    At the limit 0.2 the interpolated PRO is 0.6: area 0.2 * 0.6 / 2 = 0.06, normalised 0.3.
    """
    masks = np.array([[[1, 0, 0, 0]]])
    maps = np.array([[[1.0, 1.0, 0.0, 0.0]]])
    assert aupro(masks, maps, fpr_limit=0.2) == pytest.approx(0.3)


def test_aupro_weights_regions_equally_not_by_area() -> None:
    """A large region found and a small one missed give PRO 1/2, whereas pixel recall would be ~1."""
    masks = np.zeros((1, 10, 10), dtype=np.uint8)
    masks[0, 0:5, 0:5] = 1  # 25 pixels, found
    masks[0, 9, 9] = 1  # 1 pixel, missed
    maps = np.zeros((1, 10, 10), dtype=np.float32)
    maps[0, 0:5, 0:5] = 1.0
    curve = PixelCurve.from_maps(masks, maps)
    assert curve.pro[0] == pytest.approx(0.5)
    assert curve.tpr[0] == pytest.approx(25 / 26)


def test_aupro_perfect_and_constant_predictors() -> None:
    masks, _ = _random_pixels()
    perfect = (masks > 0).astype(np.float32)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert pixel_auroc(masks, perfect) == pytest.approx(1.0)
    constant = np.full(masks.shape, 0.25, dtype=np.float32)
    # One threshold: (FPR 1, PRO 1); the curve is the diagonal, so the normalised area is 0.3 / 2.
    assert aupro(masks, constant) == pytest.approx(0.15)
    assert pixel_auroc(masks, constant) == pytest.approx(0.5)
    assert PixelCurve.from_maps(masks, constant).f1_max().recall == pytest.approx(1.0)


def test_aupro_matches_an_independent_threshold_sweep() -> None:
    """Brute force: evaluate PRO and FPR at every distinct threshold with explicit loops."""
    masks, maps = _random_pixels(seed=5)
    regions, _ = label_regions(masks)
    normal = regions == 0
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        overlaps = [above[regions == k].mean() for k in range(1, int(regions.max()) + 1)]
        points.append((above[normal].mean(), float(np.mean(overlaps))))
    fpr, pro = np.array(points).T
    limit = 0.3
    grid_pro = np.interp(limit, fpr, pro)  # fpr is non-decreasing; interp takes the last at ties
    keep = fpr <= limit
    x, y = np.append(fpr[keep], limit), np.append(pro[keep], grid_pro)
    expected = np.trapezoid(y, x) / limit
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_pixel_metrics_validate_inputs() -> None:
    masks, maps = _random_pixels()
    with pytest.raises(ValueError, match="differ in shape"):
        PixelCurve.from_maps(masks, maps[:2])
    with pytest.raises(ValueError, match="defect pixel"):
        PixelCurve.from_maps(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="normal pixels"):
        PixelCurve.from_maps(np.ones_like(masks), maps)
    broken = maps.copy()
    broken[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        PixelCurve.from_maps(masks, broken)
    with pytest.raises(ValueError, match="fpr_limit"):
        PixelCurve.from_maps(masks, maps).aupro(0.0)
