"""The one engine: fitting, calibrating and scoring over lists of image URIs.

Every job runs these three functions and nothing else: the train, retrain and score flows (through
:mod:`padim.jobs.training` and :mod:`padim.jobs.inspection`), ``padim evaluate`` (:mod:`padim.evaluation.run`),
the demo and the benchmarks.

* :func:`fit_images` folds normal images into Gaussian statistics;
* :func:`score_images` turns images into anomaly maps and report figures, optionally folding the
  same backbone pass into statistics (what calibration needs);
* :func:`calibrate` scores held-out normal images with :func:`score_images` and sets the
  thresholds from them.

Each streams batches from :func:`padim.io.loading.iter_batches` (reading and decoding in background
threads while the backbone runs) and never keeps more than a few batches in memory. Which
implementation computes the statistics and distances (the fast one from the stage maps, or the
plain one from the whole embedding) is decided in one place, :func:`padim.core.execution.use_fast_path`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from padim.core.calibration import calibrate_thresholds
from padim.core.config import PadimConfig
from padim.core.embedding import EmbeddingProjector
from padim.core.execution import auto_batch_size
from padim.core.fitter import PadimFitter
from padim.core.model import PadimModel, Thresholds
from padim.core.preprocessing import input_to_original_xy
from padim.core.statistics import GaussianAccumulator
from padim.io.loading import ImageRecord, SkipRule, iter_batches, load_reference
from padim.jobs.progress import progress_bar
from padim.settings import ComputePath, Precision, Runtime

KeepMaps = Literal["anomalous", "all", "none"]
"""Which anomaly maps :func:`score_images` returns: ``"anomalous"``, ``"all"`` or ``"none"``."""

_KEEP_MAPS = frozenset({"anomalous", "all", "none"})


@dataclass
class FitResult:
    """Statistics of a set of images and what happened to each image.

    Attributes:
        accumulator: The statistics of the good images.
        weights_sha256: Identity of the backbone weights the statistics were computed with.
        fitted: Records of the images in the statistics.
        failed: Records of the images that could not be used, with reasons.
        skipped: Records of the images the ``skip`` rule left out (e.g. already in the model).
        seconds: Wall time of the pass.
        reference: The registration reference ``(S, S)`` the images were registered onto
            (``registration="phase"``), for :func:`padim.core.fitter.build_model`.
    """

    accumulator: GaussianAccumulator
    weights_sha256: str
    fitted: list[ImageRecord] = field(default_factory=list)
    failed: list[ImageRecord] = field(default_factory=list)
    skipped: list[ImageRecord] = field(default_factory=list)
    seconds: float = 0.0
    reference: torch.Tensor | None = None


@dataclass
class ScoredImage:
    """The outcome of scoring one image.

    Attributes:
        record: Identity of the image (uri, sha256, original size, error, skipped).
        score: Raw image score (max of the anomaly map), or ``None`` for an error.
        threshold: Image threshold of the model, or ``None`` when uncalibrated.
        normalized_score: ``score / threshold`` (1.0 is the decision boundary).
        is_anomaly: ``score > threshold``.
        defect_area_fraction: Share of map pixels above the pixel threshold.
        max_x: Column of the map maximum in original image pixels.
        max_y: Row of the map maximum in original image pixels.
        anomaly_map: The map over the model input ``(S, S)``, when kept.
    """

    record: ImageRecord
    score: float | None = None
    threshold: float | None = None
    normalized_score: float | None = None
    is_anomaly: bool | None = None
    defect_area_fraction: float | None = None
    max_x: int | None = None
    max_y: int | None = None
    anomaly_map: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        """True when the image was scored."""
        return self.record.ok and self.score is not None

    @property
    def skipped(self) -> bool:
        """True when the ``skip`` rule left the image out (not an error, not scored)."""
        return self.record.skipped


@dataclass
class Calibration:
    """Thresholds set on held-out normal images, and the scores behind them.

    Attributes:
        thresholds: The calibrated thresholds.
        scores: Image scores of the scored held-out images, shape ``(N,)``.
        maps: Their anomaly maps, shape ``(N, S, S)``, float32.
        scored: Records of the scored images, in the order of ``scores``.
        failed: Records of the held-out images that could not be scored, with reasons.
    """

    thresholds: Thresholds
    scores: np.ndarray
    maps: np.ndarray
    scored: list[ImageRecord]
    failed: list[ImageRecord]


def fit_images(
    uris: Sequence[str],
    config: PadimConfig,
    *,
    batch_size: int | None = None,
    device: str | torch.device | None = "auto",
    path: ComputePath = "auto",
    runtime: Runtime = "auto",
    precision: Precision = "f32",
    accumulator: GaussianAccumulator | None = None,
    projector: EmbeddingProjector | None = None,
    skip: SkipRule | None = None,
    num_workers: int | None = None,
    description: str = "fit",
) -> FitResult:
    """Accumulate the Gaussian statistics of normal images.

    Args:
        uris: Image URIs (files that cannot be decoded are reported in ``failed``).
        config: Model options.
        batch_size: Images per backbone batch; ``None`` picks one for the device.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        path: Implementation of the statistics (see :func:`padim.core.execution.use_fast_path`).
        runtime: Where the backbone runs (see :data:`padim.settings.Runtime`).
        precision: Arithmetic of an OpenVINO backbone.
        accumulator: Statistics to continue from (incremental refit), or ``None``.
        projector: The channel reduction of the statistics being continued (default: drawn
            from the configuration's seed).
        skip: Rule on ``(uri, sha256)`` for images to leave out after hashing (e.g. images
            already in the model).
        num_workers: Decode threads (default: one per CPU).
        description: Label of the progress bar.

    Returns:
        The statistics and the per-image outcomes.

    Raises:
        ImageReadError: Storage could not deliver an image (nothing is returned half-fitted).
    """
    start = time.perf_counter()
    fitter = PadimFitter(
        config,
        device=device,
        accumulator=accumulator,
        projector=projector,
        path=path,
        runtime=runtime,
        precision=precision,
        reference=load_reference(config),
    )
    result = FitResult(accumulator=fitter.accumulator, weights_sha256=fitter.backbone.weights_sha256)
    size = batch_size or auto_batch_size(config, fitter.device)
    pin = fitter.device.type == "cuda"
    with progress_bar(len(uris), description) as bar:
        transform = fitter.preprocessor(normalize=False)
        for batch in iter_batches(uris, transform, size, num_workers=num_workers, pin_memory=pin, skip=skip):
            result.failed.extend(batch.failed)
            result.skipped.extend(batch.skipped)
            if batch.images is not None:
                fitter.update(batch.images)
                result.fitted.extend(batch.records)
            bar.advance(len(batch.records) + len(batch.failed) + len(batch.skipped))
    fitter.flush()
    result.reference = fitter.reference
    result.seconds = time.perf_counter() - start
    return result


def score_images(
    model: PadimModel,
    uris: Sequence[str],
    *,
    batch_size: int | None = None,
    keep_maps: KeepMaps = "anomalous",
    skip: SkipRule | None = None,
    fold_into: PadimFitter | None = None,
    num_workers: int | None = None,
    description: str = "score",
) -> Iterator[ScoredImage]:
    """Score images, yielding one result per URI (in order), bad and skipped files included.

    Args:
        model: A fitted model (on its target device).
        uris: Image URIs.
        batch_size: Images per backbone batch; ``None`` picks one for the model's device.
        keep_maps: Which anomaly maps to return: ``"anomalous"``, ``"all"`` or ``"none"``.
        skip: Rule on ``(uri, sha256)`` for images to leave out after hashing (e.g. already
            scored with this content).
        fold_into: A fitter of the same model configuration (and projector) that the same
            backbone pass is also folded into (calibration merges its held-out images so).
        num_workers: Decode threads.
        description: Label of the progress bar.

    Yields:
        One :class:`ScoredImage` per input URI.

    Raises:
        ImageReadError: Storage could not deliver an image.
    """
    if keep_maps not in _KEEP_MAPS:
        raise ValueError(f"keep_maps must be 'anomalous', 'all' or 'none', got {keep_maps!r}")
    device = model.mean.device
    size = batch_size or auto_batch_size(model.config, device)
    model.extractor()  # load the backbone before the loader starts
    transform = model.preprocessor(normalize=False)
    with progress_bar(len(uris), description) as bar:
        batches = iter_batches(
            uris, transform, size, num_workers=num_workers, pin_memory=device.type == "cuda", skip=skip
        )
        for index, batch in enumerate(batches):
            results = {r.uri: ScoredImage(record=r) for r in (*batch.failed, *batch.skipped)}
            if batch.images is not None:
                features = model.extract(batch.images)
                if fold_into is not None:  # an augmenting fitter transforms the images themselves
                    fold_into.update(batch.images if fold_into.needs_images else features)
                maps = model.anomaly_maps(features)
                for scored in summarise_batch(model, batch.records, maps, keep_maps):
                    results[scored.record.uri] = scored
            # The loader chunks the URIs in order; yield in the caller's order (outcomes interleave).
            for uri in uris[index * size : (index + 1) * size]:
                yield results[uri]
            bar.advance(len(batch.records) + len(batch.failed) + len(batch.skipped))


def summarise_batch(
    model: PadimModel, records: Sequence[ImageRecord], anomaly_maps: torch.Tensor, keep_maps: KeepMaps
) -> list[ScoredImage]:
    """Turn a batch of anomaly maps into the figures of report rows.

    The reductions (maximum, its location, the area above the pixel threshold, the finiteness
    check) run batched on the maps' device; only these few numbers, and the maps that are kept,
    are copied to the host. A map with NaN or infinite values becomes an error result: such values
    never reach a report.

    Args:
        model: The model that produced the maps.
        records: The images' identities, one per map.
        anomaly_maps: Shape ``(B, S, S)``, any device.
        keep_maps: ``"anomalous"``, ``"all"`` or ``"none"``.

    Returns:
        One scored image per record.
    """
    flat = anomaly_maps.float().flatten(1)
    side = anomaly_maps.shape[-1]
    # A NaN or infinity anywhere makes a map's sum non-finite (one cheap pass); only when some sum
    # is not finite (or a huge finite map overflowed it) is every value checked.
    finite = torch.isfinite(flat.sum(dim=1))
    if not bool(finite.all()):
        finite = torch.isfinite(flat).all(dim=1)
    scores, positions = flat.max(dim=1)  # a non-finite map's maximum is not used: it is an error
    thresholds = model.thresholds
    area = (flat > thresholds.pixel).sum(dim=1) / flat.shape[1] if thresholds is not None else None
    finite_h, scores_h, positions_h = finite.cpu().tolist(), scores.double().cpu().tolist(), positions.cpu().tolist()
    area_h = area.double().cpu().tolist() if area is not None else [None] * len(records)
    threshold = thresholds.image if thresholds is not None else None
    results = []
    for i, record in enumerate(records):
        if not finite_h[i]:
            failed = ImageRecord(
                uri=record.uri,
                sha256=record.sha256,
                width=record.width,
                height=record.height,
                error="non-finite anomaly map (NaN or infinity); image not scored",
            )
            results.append(ScoredImage(record=failed))
            continue
        score = scores_h[i]
        max_x, max_y = input_to_original_xy(
            positions_h[i] % side, positions_h[i] // side, record.width or side, record.height or side, model.config
        )
        is_anomaly = bool(score > threshold) if threshold is not None else None
        keep = keep_maps == "all" or (keep_maps == "anomalous" and bool(is_anomaly))
        results.append(
            ScoredImage(
                record=record,
                score=score,
                threshold=threshold,
                normalized_score=score / threshold if threshold else None,
                is_anomaly=is_anomaly,
                defect_area_fraction=area_h[i],
                max_x=max_x,
                max_y=max_y,
                anomaly_map=anomaly_maps[i].float().cpu().numpy() if keep else None,
            )
        )
    return results


def calibrate(
    model: PadimModel,
    uris: Sequence[str],
    *,
    image_fpr: float,
    pixel_fpr: float,
    batch_size: int | None = None,
    fold_into: PadimFitter | None = None,
    num_workers: int | None = None,
    description: str = "calibrate",
) -> Calibration:
    """Set the thresholds on held-out normal images, scored exactly as production scores.

    Args:
        model: Model fitted without these images.
        uris: Held-out normal image URIs.
        image_fpr: Target false-positive rate of the image threshold.
        pixel_fpr: Target false-positive rate of the pixel threshold.
        batch_size: Images per backbone batch; ``None`` picks one for the device.
        fold_into: If given, the images are also folded into these statistics on the same
            backbone pass (held-out images then join the final model).
        num_workers: Decode threads.
        description: Label of the progress bar.

    Returns:
        The thresholds and the held-out scores and maps.

    Raises:
        ValueError: If no held-out image could be scored.
        ImageReadError: Storage could not deliver an image.
    """
    scored: list[ImageRecord] = []
    failed: list[ImageRecord] = []
    scores: list[float] = []
    maps: list[np.ndarray] = []
    for result in score_images(
        model,
        uris,
        batch_size=batch_size,
        keep_maps="all",
        fold_into=fold_into,
        num_workers=num_workers,
        description=description,
    ):
        if result.ok and result.anomaly_map is not None and result.score is not None:
            scored.append(result.record)
            scores.append(result.score)
            maps.append(result.anomaly_map)
        else:
            failed.append(result.record)
    if not scored:
        reasons = "; ".join(f"{r.uri}: {r.error}" for r in failed[:3])
        raise ValueError(f"none of the {len(uris)} held-out normal images could be scored ({reasons})")
    score_array, map_array = np.asarray(scores, dtype=np.float64), np.stack(maps)
    thresholds = calibrate_thresholds(score_array, map_array, image_fpr=image_fpr, pixel_fpr=pixel_fpr)
    return Calibration(thresholds=thresholds, scores=score_array, maps=map_array, scored=scored, failed=failed)
