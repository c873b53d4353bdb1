"""Fitting and scoring over lists of image URIs: background loading feeding the model.

These functions are what the Prefect tasks call; they hold no orchestration logic. Each one streams
batches from :func:`padim.images.iter_batches` (reading and decoding in background threads while
the backbone runs) and never keeps more than a few batches in memory.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from padim.config import PadimConfig
from padim.images import ImageRecord, iter_batches
from padim.model import PadimFitter, PadimModel, resolve_device
from padim.preprocessing import input_to_original_xy
from padim.progress import progress_bar
from padim.statistics import GaussianAccumulator


@dataclass
class FitResult:
    """Statistics of a set of images and what happened to each image.

    Attributes:
        accumulator: The statistics of the good images.
        fitted: Records of the images in the statistics.
        failed: Records of the images that could not be read, with reasons.
        seconds: Wall time of the pass.
    """

    accumulator: GaussianAccumulator
    fitted: list[ImageRecord] = field(default_factory=list)
    failed: list[ImageRecord] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class ScoredImage:
    """The outcome of scoring one image.

    Attributes:
        record: Identity of the image (uri, sha256, original size, error).
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
        return self.record.error is None and self.score is not None


def fit_images(
    uris: Sequence[str],
    config: PadimConfig,
    *,
    accumulator: GaussianAccumulator | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = "auto",
    num_workers: int | None = None,
    description: str = "fit",
) -> FitResult:
    """Accumulate the Gaussian statistics of normal images.

    Args:
        uris: Image URIs (bad files are skipped and reported).
        config: Model options.
        accumulator: Statistics to continue from (incremental refit), or ``None``.
        batch_size: Images per backbone batch.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        num_workers: Decode threads (default: one per CPU).
        description: Label of the progress bar.

    Returns:
        The statistics and the per-image outcomes.
    """
    start = time.perf_counter()
    fitter = PadimFitter(config, device=device, accumulator=accumulator)
    result = FitResult(accumulator=fitter.accumulator)
    pin = fitter.device.type == "cuda"
    with progress_bar(len(uris), description) as bar:
        transform = fitter.preprocessor(normalize=False)
        for batch in iter_batches(uris, transform, batch_size, num_workers=num_workers, pin_memory=pin):
            result.failed.extend(batch.failed)
            if batch.images is not None:
                fitter.update(batch.images)
                result.fitted.extend(batch.records)
            bar.advance(len(batch.records) + len(batch.failed))
    fitter.flush()
    result.seconds = time.perf_counter() - start
    return result


def score_images(
    model: PadimModel,
    uris: Sequence[str],
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    keep_maps: str = "anomalous",
    description: str = "score",
) -> Iterator[ScoredImage]:
    """Score images, yielding one result per URI (in order), bad files included as errors.

    Args:
        model: A fitted model (on its target device).
        uris: Image URIs.
        batch_size: Images per backbone batch.
        num_workers: Decode threads.
        keep_maps: Which anomaly maps to return: ``"anomalous"``, ``"all"`` or ``"none"``.
        description: Label of the progress bar.

    Yields:
        One :class:`ScoredImage` per input URI.
    """
    if keep_maps not in {"anomalous", "all", "none"}:
        raise ValueError(f"keep_maps must be 'anomalous', 'all' or 'none', got {keep_maps!r}")
    pin = model.mean.device.type == "cuda"
    model.extractor()  # load the backbone before the loader starts
    transform = model.preprocessor(normalize=False)
    with progress_bar(len(uris), description) as bar:
        batches = iter_batches(uris, transform, batch_size, num_workers=num_workers, pin_memory=pin)
        for index, batch in enumerate(batches):
            results: dict[str, ScoredImage] = {r.uri: ScoredImage(record=r) for r in batch.failed}
            if batch.images is not None:
                maps = model.anomaly_maps(batch.images)
                for scored in summarise_batch(model, batch.records, maps, keep_maps):
                    results[scored.record.uri] = scored
            # The loader chunks the URIs in order; yield in the caller's order (failed and good interleave).
            for uri in uris[index * batch_size : (index + 1) * batch_size]:
                yield results[uri]
            bar.advance(len(batch.records) + len(batch.failed))


def summarise_batch(
    model: PadimModel, records: Sequence[ImageRecord], anomaly_maps: torch.Tensor, keep_maps: str
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


def collect_normal_maps(
    model: PadimModel,
    uris: Sequence[str],
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    accumulate_into: GaussianAccumulator | None = None,
    description: str = "calibrate",
) -> tuple[np.ndarray, np.ndarray, list[ImageRecord], list[ImageRecord]]:
    """Score held-out normal images for threshold calibration.

    Args:
        model: Model fitted without these images.
        uris: Held-out normal image URIs.
        batch_size: Images per backbone batch.
        num_workers: Decode threads.
        accumulate_into: If given, the images' embeddings are also folded into these statistics
            (so held-out images can join the final model without a second backbone pass).
        description: Label of the progress bar.

    Returns:
        ``(scores (N,), maps (N, S, S) float32, scored records, failed records)``.
    """
    scores: list[float] = []
    maps: list[np.ndarray] = []
    scored: list[ImageRecord] = []
    failed: list[ImageRecord] = []
    extractor = model.extractor()
    with progress_bar(len(uris), description) as bar:
        transform = model.preprocessor(normalize=False)
        for batch in iter_batches(uris, transform, batch_size, num_workers=num_workers):
            failed.extend(batch.failed)
            if batch.images is not None:
                embeddings = extractor(batch.images)
                if accumulate_into is not None:
                    accumulate_into.update(embeddings)
                batch_maps = model.anomaly_maps_from_embeddings(embeddings).cpu()
                maps.extend(batch_maps.numpy())
                scores.extend(batch_maps.flatten(1).amax(1).tolist())
                scored.extend(batch.records)
            bar.advance(len(batch.records) + len(batch.failed))
    side = model.config.input_size
    stacked = np.stack(maps) if maps else np.zeros((0, side, side), dtype=np.float32)
    return np.asarray(scores, dtype=np.float64), stacked, scored, failed


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return resolve_device("auto")
