"""Tests of padim.evaluation's layout, run, results and figures on a tiny MVTec-layout set (random backbone, 64 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from padim.core.config import PadimConfig
from padim.evaluation.evaluate import evaluate_dataset
from padim.evaluation.figures import write_figures
from padim.evaluation.mvtec import DatasetLayoutError, apply_geometry, discover_layout, load_mask
from padim.evaluation.results import summarize, write_json
from padim.evaluation.run import EvaluationRun, run_evaluation
from padim.reports.visualize import overlay_heatmap
from padim.settings import TrainSettings

SIZE = 64
CONFIG = PadimConfig(backbone="resnet18", weights="random", channels=20, image_size=SIZE, crop_size=SIZE)
REQUIRED_KEYS = {
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "image_f1_max",
    "image_f1_threshold",
    "pixel_f1_max",
    "calibrated_threshold",
    "calibrated_precision",
    "calibrated_recall",
    "calibrated_fpr",
    "oracle_threshold",
    "fit_images_per_s",
    "score_images_per_s",
    "peak_rss_mb",
    "n_train",
    "n_test",
    "config_backbone",
    "image_auroc_square",
    "image_auroc_stripe",
}


def _texture(rng: np.random.Generator) -> np.ndarray:
    """A smooth grey random texture, shape (SIZE, SIZE), uint8."""
    noise = rng.normal(size=(SIZE // 8, SIZE // 8))
    texture = np.kron(noise, np.ones((8, 8))) * 12 + rng.normal(size=(SIZE, SIZE)) * 6 + 100
    return np.clip(texture, 0, 255).astype(np.uint8)


def _save_rgb(path: Path, gray: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray, mode="L").convert("RGB").save(path)


def _save_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 train/good, 3 test/good, 3 test/square (bright square), 2 test/stripe, with masks."""
    root = tmp_path_factory.mktemp("mvtec") / "toy"
    rng = np.random.default_rng(0)
    for i in range(12):
        _save_rgb(root / "train" / "good" / f"{i:03d}.png", _texture(rng))
    for i in range(3):
        _save_rgb(root / "test" / "good" / f"{i:03d}.png", _texture(rng))
    for kind, count in (("square", 3), ("stripe", 2)):
        for i in range(count):
            image = _texture(rng)
            mask = np.zeros((SIZE, SIZE), dtype=bool)
            y, x = 12 + 9 * i, 16 + 7 * i
            if kind == "square":
                mask[y : y + 14, x : x + 14] = True
            else:
                mask[y : y + 4, 8:56] = True
            image[mask] = 250
            _save_rgb(root / "test" / kind / f"{i:03d}.png", image)
            _save_mask(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture(scope="module")
def calibrated_run(dataset: Path) -> EvaluationRun:
    settings = TrainSettings(holdout_fraction=0.25, min_holdout=3, batch_size=8)
    return run_evaluation(dataset, CONFIG, settings, compare_unmerged=True)


def test_discover_layout(dataset: Path) -> None:
    layout = discover_layout(dataset)
    assert len(layout.train) == 12
    assert [image.kind for image in layout.test] == ["good"] * 3 + ["square"] * 3 + ["stripe"] * 2
    assert layout.kinds == ["square", "stripe"]
    assert layout.test[0].mask_uri is None
    assert layout.test[3].mask_uri is not None and layout.test[3].mask_uri.endswith("ground_truth/square/000_mask.png")


def test_evaluation_result_keys_and_quality(dataset: Path, calibrated_run: EvaluationRun) -> None:
    result = summarize(calibrated_run)
    flat = result.to_dict()
    assert set(flat) >= REQUIRED_KEYS
    assert flat["n_train"] == 12 and flat["n_test"] == 8 and flat["n_holdout"] == 3
    assert flat["n_test_anomalous"] == 5
    # A bright square on a grey texture is obvious even to a random backbone.
    assert flat["image_auroc"] >= 0.99
    assert flat["pixel_auroc"] > 0.9
    assert flat["aupro"] > 0.5
    assert flat["image_auroc_square"] >= 0.99 and flat["image_auroc_stripe"] >= 0.99
    assert flat["oracle_threshold"] == flat["image_f1_threshold"]
    assert flat["calibrated_threshold"] == pytest.approx(float(calibrated_run.holdout_scores.max()))
    assert 0.0 <= flat["calibrated_fpr"] <= 1.0 and 0.0 <= flat["calibrated_recall"] <= 1.0
    assert flat["holdout_merged"] is True
    assert flat["fit_images_per_s"] > 0 and flat["score_images_per_s"] > 0 and flat["peak_rss_mb"] > 50
    # Defective images score above every good one.
    labels = calibrated_run.labels
    assert calibrated_run.scores[labels].min() > calibrated_run.scores[~labels].max()
    # Masks went through the same geometry: every defect pixel is inside the map's high region.
    assert calibrated_run.masks.shape == calibrated_run.maps.shape == (8, SIZE, SIZE)
    assert calibrated_run.masks[:3].sum() == 0 and calibrated_run.masks[3].sum() == 14 * 14


def test_json_is_flat_and_readable(dataset: Path, calibrated_run: EvaluationRun, tmp_path: Path) -> None:
    result = summarize(calibrated_run)
    path = tmp_path / "out" / "eval.json"
    write_json(result, path)
    loaded = json.loads(path.read_text())
    assert isinstance(loaded, dict)
    assert all(isinstance(v, (int, float, str, bool)) or v is None for v in loaded.values())
    assert loaded["image_auroc"] == pytest.approx(result.image_auroc)
    assert loaded["config_channels"] == 20


def test_evaluate_dataset_without_holdout_equals_the_merged_model(
    dataset: Path, calibrated_run: EvaluationRun, tmp_path: Path
) -> None:
    """Fitting on every training image (no hold-out) gives the model that merging the hold-out's
    statistics gave: same maps, same metrics. Also writes the figures."""
    figures = tmp_path / "figures"
    settings = TrainSettings(holdout_fraction=0.0, batch_size=8)
    result = evaluate_dataset(dataset, CONFIG, settings, figures_dir=figures, roc=True)
    merged = summarize(calibrated_run)
    assert result.n_train == merged.n_train == 12
    assert result.image_auroc == pytest.approx(merged.image_auroc)
    assert result.pixel_auroc == pytest.approx(merged.pixel_auroc, abs=1e-6)
    assert result.aupro == pytest.approx(merged.aupro, abs=1e-4)
    assert result.image_f1_threshold == pytest.approx(merged.image_f1_threshold, rel=1e-4)
    # Without a hold-out nothing is calibrated.
    flat = result.to_dict()
    assert flat["calibrated_threshold"] is None and flat["n_holdout"] == 0 and flat["holdout_merged"] is False
    # The fit-set-only model (9 images) scores differently from the merged one (12 images).
    assert calibrated_run.unmerged_scores is not None
    assert not np.allclose(calibrated_run.unmerged_scores, calibrated_run.scores, rtol=1e-3)

    panels = sorted(p.relative_to(figures).as_posix() for p in figures.rglob("*.png"))
    assert "roc_image.png" in panels and "roc_pixel.png" in panels
    assert "square/000.png" in panels and "good/002.png" in panels and "stripe/001.png" in panels
    assert len(panels) == 8 + 2
    with Image.open(figures / "square" / "000.png") as panel:
        assert panel.size == (4 * SIZE, SIZE + 16)
        # Second tile is the ground-truth mask: white inside the square, black outside.
        gt = np.asarray(panel.convert("L"))[16:, SIZE : 2 * SIZE]
        assert gt[12 + 5, 16 + 5] == 255 and gt[2, 2] == 0


def test_write_figures_uses_the_calibrated_pixel_threshold(calibrated_run: EvaluationRun, tmp_path: Path) -> None:
    result = summarize(calibrated_run)
    written = write_figures(calibrated_run, result, tmp_path / "f")
    assert len(written) == 8  # no ROC curves unless asked
    assert calibrated_run.thresholds is not None
    with Image.open(tmp_path / "f" / "square" / "000.png") as panel:
        predicted = np.asarray(panel.convert("L"))[16:, 3 * SIZE :] > 127
    np.testing.assert_array_equal(predicted, calibrated_run.maps[3] > calibrated_run.thresholds.pixel)


def test_roc_needs_figures_dir(dataset: Path) -> None:
    with pytest.raises(ValueError, match="figures_dir"):
        evaluate_dataset(dataset, CONFIG, roc=True)


def test_missing_mask_is_a_layout_error(dataset: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    for sub in ("train/good", "test/good", "test/square"):
        (broken / sub).mkdir(parents=True)
    for src in sorted((dataset / "train" / "good").iterdir())[:3]:
        (broken / "train" / "good" / src.name).write_bytes(src.read_bytes())
    (broken / "test" / "square" / "000.png").write_bytes((dataset / "test" / "square" / "000.png").read_bytes())
    with pytest.raises(DatasetLayoutError, match="has no mask"):
        discover_layout(broken)
    with pytest.raises(DatasetLayoutError, match="missing"):
        discover_layout(tmp_path / "nowhere")


def test_mask_follows_the_image_geometry(tmp_path: Path) -> None:
    """A non-square image with aspect-preserving resize and crop: the mask lands on the defect."""
    config = PadimConfig(image_size=48, crop_size=32, resize_mode="shorter_side")
    gray = np.zeros((60, 100), dtype=np.uint8)
    gray[20:40, 40:70] = 255  # the "defect", off-centre
    image = Image.fromarray(gray, mode="L")
    mask_path = tmp_path / "m_mask.png"
    image.save(mask_path)
    view = np.asarray(apply_geometry(image, config, Image.Resampling.BILINEAR)) > 127
    mask = load_mask(str(mask_path), (100, 60), config)
    assert mask.shape == (32, 32) and mask.any()
    # Nearest and bilinear agree away from the edges of the defect.
    assert np.mean(mask == view) > 0.95
    with pytest.raises(DatasetLayoutError, match="but its image is"):
        load_mask(str(mask_path), (60, 100), config)


def test_overlay_heatmap_outlines_the_region_above_threshold() -> None:
    image = Image.new("RGB", (32, 32), (0, 0, 0))
    anomaly = np.zeros((32, 32), dtype=np.float32)
    anomaly[8:24, 8:24] = 10.0
    out = np.asarray(overlay_heatmap(image, anomaly, threshold=5.0, vmin=0.0, vmax=10.0))
    assert out.shape == (32, 32, 3)
    assert tuple(out[8, 8]) == (255, 255, 255)  # outline on the region's border
    assert tuple(out[16, 16]) != (255, 255, 255)  # not inside
    assert tuple(out[0, 0]) != tuple(out[16, 16])  # low and high values differ in colour
    no_outline = np.asarray(overlay_heatmap(image, anomaly, threshold=None, vmin=0.0, vmax=10.0))
    assert tuple(no_outline[8, 8]) != (255, 255, 255)
    with pytest.raises(ValueError, match="vmax"):
        overlay_heatmap(image, anomaly, 5.0, vmin=1.0, vmax=1.0)
