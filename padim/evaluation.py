"""Evaluate a PaDiM configuration on a data set in the MVTec AD layout.

Layout (local folder or any fsspec URL)::

    DATASET/train/good/*                               normal images (fit on these)
    DATASET/test/good/*                                normal test images (no mask: all normal)
    DATASET/test/<kind>/*                              defective test images
    DATASET/ground_truth/<kind>/<stem>_mask.png        their masks (> 0 = defect)

:func:`evaluate_dataset` runs exactly what ``padim train`` and ``padim score`` run - the same
hold-out split (:func:`padim.training.plan_training`), the same fit (:func:`padim.engine.fit_images`),
the same calibration and merge (:func:`padim.training.calibrate_and_merge`) and the same scoring
(:func:`padim.engine.score_images`), with the same defaults (:class:`padim.settings.TrainSettings`)
- then computes the metrics of :mod:`padim.metrics` at the model's input resolution: every mask
goes through the same resize and centre crop as its image (nearest neighbour), see
:func:`padim.preprocessing.compute_geometry`.

:func:`run_evaluation` returns the raw arrays (scores, maps, masks, hold-out scores) for studies
such as ``benchmarks/accuracy.py``; :func:`summarize` turns them into an
:class:`EvaluationResult`, whose :meth:`~EvaluationResult.to_dict` is the flat JSON object
written by :func:`write_json`.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from padim.alignment import with_reference
from padim.config import PadimConfig
from padim.engine import fit_images, score_images
from padim.errors import PadimError
from padim.fsio import join_url, to_url, url_to_fs
from padim.images import list_images, load_pil
from padim.metrics import (
    PixelCurve,
    RocPoints,
    f1_max,
    image_auroc,
    image_auroc_per_kind,
    rates_at_threshold,
    roc_points,
)
from padim.model import PadimModel, Thresholds, auto_batch_size, build_model
from padim.preprocessing import compute_geometry
from padim.settings import TrainSettings
from padim.training import calibrate_and_merge, plan_training
from padim.visualize import render_panel

__all__ = [
    "AUPRO_FPR_LIMIT",
    "NORMAL_KIND",
    "DatasetLayout",
    "DatasetLayoutError",
    "EvaluationResult",
    "EvaluationRun",
    "TestImage",
    "apply_geometry",
    "discover_layout",
    "evaluate_dataset",
    "load_mask",
    "run_evaluation",
    "summarize",
    "write_figures",
    "write_json",
]

logger = logging.getLogger(__name__)

NORMAL_KIND = "good"
AUPRO_FPR_LIMIT = 0.3


class DatasetLayoutError(PadimError, ValueError):
    """The data set does not follow the MVTec layout (missing folder, mask or image)."""


@dataclass(frozen=True)
class TestImage:
    """One test image of an MVTec-layout data set.

    Attributes:
        uri: Image URI.
        kind: ``"good"`` or the defect kind (the name of its ``test/`` subfolder).
        mask_uri: URI of its ground-truth mask; ``None`` for good images (all normal).
    """

    uri: str
    kind: str
    mask_uri: str | None

    @property
    def anomalous(self) -> bool:
        """True for defective images."""
        return self.kind != NORMAL_KIND


@dataclass(frozen=True)
class DatasetLayout:
    """The images of an MVTec-layout data set.

    Attributes:
        root: The data set URL.
        train: Normal training images (sorted URIs).
        test: Test images, sorted by kind then URI.
    """

    root: str
    train: list[str]
    test: list[TestImage]

    @property
    def kinds(self) -> list[str]:
        """Defect kinds present in the test set, sorted."""
        return sorted({image.kind for image in self.test} - {NORMAL_KIND})


def _subfolders(url: str) -> list[str]:
    """Names of the direct subfolders of a folder URL, sorted."""
    fs, path = url_to_fs(url)
    entries = fs.ls(path, detail=True)
    names = [str(entry["name"]).rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "directory"]
    return sorted(name for name in names if not name.startswith("."))


def _stem(uri: str) -> str:
    """File name without folder and extension."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def discover_layout(dataset_dir: str | Path) -> DatasetLayout:
    """List the images and masks of an MVTec-layout data set.

    Args:
        dataset_dir: Folder (local path or fsspec URL) holding ``train/``, ``test/`` and
            ``ground_truth/``.

    Returns:
        The layout.

    Raises:
        DatasetLayoutError: If a folder is missing or empty, or a defective image has no mask.
    """
    root = str(dataset_dir)
    fs, root_path = url_to_fs(root)
    root = to_url(fs, root_path)
    for required in ("train/good", "test"):
        if not fs.isdir(url_to_fs(join_url(root, required))[1]):
            raise DatasetLayoutError(f"{root} is not an MVTec-layout data set: folder '{required}' is missing")
    train = list_images(join_url(root, "train", NORMAL_KIND))
    if len(train) < 2:
        folder = join_url(root, "train", NORMAL_KIND)
        raise DatasetLayoutError(f"{folder} holds {len(train)} images; at least 2 are needed")
    test: list[TestImage] = []
    for kind in _subfolders(join_url(root, "test")):
        for uri in list_images(join_url(root, "test", kind)):
            mask_uri = None if kind == NORMAL_KIND else join_url(root, "ground_truth", kind, f"{_stem(uri)}_mask.png")
            if mask_uri is not None and not fs.exists(url_to_fs(mask_uri)[1]):
                raise DatasetLayoutError(f"defective test image {uri} has no mask (expected {mask_uri})")
            test.append(TestImage(uri=uri, kind=kind, mask_uri=mask_uri))
    if not test:
        raise DatasetLayoutError(f"{join_url(root, 'test')} holds no test images")
    return DatasetLayout(root=root, train=train, test=test)


def apply_geometry(image: Image.Image, config: PadimConfig, resample: Image.Resampling) -> Image.Image:
    """Resize and crop an image (or mask) exactly as the model's preprocessing does.

    Args:
        image: Image or mask at its original size.
        config: Preprocessing options.
        resample: ``BILINEAR`` for images (as :class:`padim.preprocessing.Preprocessor`),
            ``NEAREST`` for masks.

    Returns:
        The ``(S, S)`` view the model sees.
    """
    geometry = compute_geometry(image.width, image.height, config)
    if image.size != geometry.resized:
        image = image.resize(geometry.resized, resample, reducing_gap=None)
    if geometry.crop_box != (0, 0, *geometry.resized):
        image = image.crop(geometry.crop_box)
    return image


def load_mask(mask_uri: str | None, size: tuple[int, int], config: PadimConfig) -> np.ndarray:
    """Load a ground-truth mask at the model's input resolution.

    Args:
        mask_uri: Mask URI, or ``None`` for an all-normal mask.
        size: ``(width, height)`` of the image the mask belongs to.
        config: Preprocessing options.

    Returns:
        Boolean mask of shape ``(S, S)``: ``True`` where the resized, cropped mask is ``> 0``.

    Raises:
        DatasetLayoutError: If the mask cannot be read or its size differs from the image's.
    """
    side = config.input_size
    if mask_uri is None:
        return np.zeros((side, side), dtype=bool)
    fs, path = url_to_fs(mask_uri)
    try:
        with fs.open(path, "rb") as handle, Image.open(handle) as opened:
            opened.load()
            mask = opened.copy()
    except (OSError, ValueError) as exc:
        raise DatasetLayoutError(f"cannot read mask {mask_uri}: {exc}") from exc
    if mask.size != tuple(size):
        raise DatasetLayoutError(
            f"mask {mask_uri} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}"
        )
    binary = np.asarray(mask) > 0
    if binary.ndim == 3:  # an RGB(A) mask: defect where any channel is non-zero
        binary = binary.any(axis=-1)
    resized = apply_geometry(Image.fromarray(binary.astype(np.uint8) * 255, mode="L"), config, Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


@dataclass
class EvaluationRun:
    """Raw outcome of fitting, calibrating and scoring (input of :func:`summarize`).

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
        path=settings.path,
        runtime=settings.runtime,
        precision=settings.precision,
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
            path=settings.path,
            runtime=settings.runtime,
            precision=settings.precision,
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
    """Score test images with :func:`padim.engine.score_images` (what production runs).

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
        run: Output of :func:`run_evaluation`.

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


def _figure_name(image: TestImage) -> str:
    """``<kind>/<stem>.png``."""
    return f"{image.kind}/{_stem(image.uri)}.png"


def write_figures(
    run: EvaluationRun, result: EvaluationResult, figures_dir: str | Path, roc: bool = False
) -> list[Path]:
    """Write one panel per test image and, optionally, the ROC curves.

    Panels (``figures_dir/<kind>/<stem>.png``): the model's view of the image, the ground-truth
    mask, the anomaly heat map overlaid (one colour scale for the whole test set, from its
    smallest to its largest map value) with the calibrated pixel threshold's outline, and the
    predicted mask (``map > calibrated pixel threshold``; the oracle pixel threshold when no
    hold-out was used). ROC curves: ``roc_image.png`` and ``roc_pixel.png``.

    Args:
        run: The evaluation run (images are re-read for the panels).
        result: Its metrics (AUROCs in the ROC legends, thresholds).
        figures_dir: Local output folder (created).
        roc: Also write the ROC curves.

    Returns:
        The paths written.
    """
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    threshold = run.thresholds.pixel if run.thresholds is not None else result.pixel_f1_threshold
    vmin, vmax = float(run.maps.min()), float(run.maps.max())
    if not vmax > vmin:
        vmax = vmin + 1.0
    written: list[Path] = []
    for index, image in enumerate(run.test):
        view = apply_geometry(load_pil(image.uri), run.config, Image.Resampling.BILINEAR)
        verdict = ""
        if run.thresholds is not None:
            verdict = "  anomalous" if run.scores[index] > run.thresholds.image else "  normal"
        title = f"{image.kind}/{_stem(image.uri)}  score {run.scores[index]:.2f}{verdict}"
        panel = render_panel(view, run.masks[index], run.maps[index], threshold, vmin, vmax, title)
        path = out / _figure_name(image)
        path.parent.mkdir(parents=True, exist_ok=True)
        panel.save(path)
        written.append(path)
    if roc:
        written.extend(_write_roc_figures(result, out))
    return written


def _write_roc_figures(result: EvaluationResult, out: Path) -> list[Path]:
    """Plot the image and pixel ROC curves with matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths: list[Path] = []
    for name, curve, auc in (
        ("image", result.image_roc, result.image_auroc),
        ("pixel", result.pixel_roc, result.pixel_auroc),
    ):
        if curve is None:
            continue
        figure = Figure(figsize=(4.5, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.plot(curve.fpr, curve.tpr, label=f"{name} AUROC {auc:.4f}")
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
        axes.set_xlabel("false-positive rate")
        axes.set_ylabel("true-positive rate")
        axes.set_title(f"{name} ROC")
        axes.legend(loc="lower right")
        figure.tight_layout()
        path = out / f"roc_{name}.png"
        figure.savefig(path)
        paths.append(path)
    return paths


def evaluate_dataset(
    dataset_dir: str | Path,
    config: PadimConfig | None = None,
    settings: TrainSettings | None = None,
    *,
    merge_holdout: bool = True,
    figures_dir: str | Path | None = None,
    roc: bool = False,
) -> EvaluationResult:
    """Fit on ``train/good`` (with a calibration hold-out), score ``test/*`` and compute metrics.

    Args:
        dataset_dir: MVTec-layout data set (local folder or fsspec URL).
        config: Model options (default :class:`PadimConfig()`).
        settings: How to fit and calibrate (default :class:`TrainSettings()`, as ``padim train``);
            ``holdout_fraction=0`` disables calibration.
        merge_holdout: Merge the hold-out into the final statistics after calibrating.
        figures_dir: When set, write a heat-map panel per test image there.
        roc: Also write ``roc_image.png`` and ``roc_pixel.png`` (needs ``figures_dir``).

    Returns:
        The metrics; ``result.to_dict()`` is flat and JSON-ready.

    Raises:
        DatasetLayoutError: If the data set is not in the MVTec layout or a test image or mask
            cannot be read.
        ValueError: If ``roc`` is requested without ``figures_dir`` or an option is invalid.
    """
    if roc and figures_dir is None:
        raise ValueError("roc=True needs figures_dir: the ROC curves are written there")
    run = run_evaluation(dataset_dir, config, settings, merge_holdout=merge_holdout)
    result = summarize(run)
    if figures_dir is not None:
        write_figures(run, result, figures_dir, roc=roc)
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
