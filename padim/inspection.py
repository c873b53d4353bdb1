"""The steps of a nightly inspection run, as plain functions the score flow composes.

1. :func:`resolve_model` finds the product's model version (the latest, or a given one) and
   checks the running code can serve it, before any image is read.
2. :func:`plan_scoring` drops images this model version has already scored (re-runs are
   idempotent) and splits the rest into shards.
3. :func:`score_shard` scores one shard, writes heat maps of anomalous images and the shard's
   report file (one Parquet file, written atomically), and returns only counts and the top
   anomalies.
4. :func:`check_drift` compares tonight's scores with the model's calibration.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from padim.artifact import check_servable, load_model
from padim.errors import IncompatibleModelError, PadimError
from padim.fsio import write_bytes_atomic
from padim.images import load_pil
from padim.model import PadimModel, auto_batch_size, resolve_device
from padim.pipeline import ScoredImage, score_images
from padim.preprocessing import map_to_original
from padim.reports import make_error_row, make_ok_row, write_report_rows
from padim.store import ModelStore

TOP_ANOMALIES = 10


class ScoreSettings(BaseModel):
    """How a score run works.

    Attributes:
        batch_size: Images per backbone batch; ``None`` picks one that fills the device.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        shard_size: Images per score task.
        heatmaps: Write a heat-map PNG for every anomalous image.
        drift_max_anomaly_rate: Share of anomalous images above which the night counts as
            drifted; ``None`` = ``max(5 x the calibrated image FPR, 0.1)`` (with tens of held-out
            images the realised false-positive rate scatters around its target by a few percent).
        drift_max_median_ratio: Tonight's median score over the calibration median above which
            the bulk of the scores counts as drifted.
        drift_min_images: Fewest scored images for a drift decision.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int | None = Field(default=None, ge=1, le=4096)
    device: str = "auto"
    shard_size: int = Field(default=500, ge=1)
    heatmaps: bool = True
    drift_max_anomaly_rate: float | None = Field(default=None, gt=0.0, le=1.0)
    drift_max_median_ratio: float = Field(default=1.5, gt=1.0)
    drift_min_images: int = Field(default=20, ge=1)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in {"auto", "cpu", "cuda"} and not value.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {value!r}")
        return value


@dataclass
class ResolvedModel:
    """The model version a run scores with.

    Attributes:
        version: Version name.
        url: Folder URL.
        backbone: Backbone name.
        image_threshold: Calibrated image threshold.
    """

    version: str
    url: str
    backbone: str
    image_threshold: float


@dataclass
class ShardReport:
    """What one score task produced.

    Attributes:
        n_images: Images in the shard.
        n_scored: Images scored.
        n_anomalies: Images above the threshold.
        n_errors: Images that could not be scored (each still has a report row).
        report_files: Parquet files written.
        normalized_scores: ``score / threshold`` of every scored image (for the drift check).
        top: The shard's highest-scoring images (dicts with uri, score, heat map...).
    """

    n_images: int = 0
    n_scored: int = 0
    n_anomalies: int = 0
    n_errors: int = 0
    report_files: list[str] = field(default_factory=list)
    normalized_scores: list[float] = field(default_factory=list)
    top: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DriftResult:
    """Tonight's scores against the model's calibration.

    Attributes:
        detected: True when a bound was passed.
        anomaly_rate: Share of scored images above the threshold.
        max_anomaly_rate: The bound on it.
        median_ratio: Tonight's median score over the calibration median (``None`` if unknown).
        max_median_ratio: The bound on it.
        n_scored: Images the decision is based on.
        reasons: Which bounds were passed, in words.
    """

    detected: bool
    anomaly_rate: float
    max_anomaly_rate: float
    median_ratio: float | None
    max_median_ratio: float
    n_scored: int
    reasons: list[str] = field(default_factory=list)


def resolve_model(
    store: ModelStore, product: str, version: str | None = None, device: str | None = None
) -> ResolvedModel:
    """Find and check the model version to score with, before any image is read.

    With ``device``, the model is also loaded into this process's cache (:func:`cached_model`)
    and its backbone attached: every file's checksum, the tensors' shapes against the
    configuration (input size, channels) and the backbone weights' identity are then checked
    here, once, rather than in the first score task after the images were listed and read.
    Tasks running in this process (the default thread runner) reuse the loaded model.

    Args:
        store: Model store.
        product: Product name.
        version: A version name, or ``None`` for the latest.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` to load and check the whole model; ``None``
            checks only the manifest.

    Returns:
        The resolved version.

    Raises:
        ModelNotFoundError: No model (or no such version) for the product.
        ModelIntegrityError: A file of the version was altered after publishing.
        IncompatibleModelError: The running code cannot serve the model (format, backbone, taps,
            input size, channels, backbone weights), or it has no threshold.
        WeightsUnavailableError: The backbone weights the model needs cannot be loaded.
    """
    version = version or store.latest(product)
    url = store.version_url(product, version)
    manifest = store.read_manifest(product, version)
    config = check_servable(manifest)
    thresholds = manifest.get("thresholds") or {}
    if not thresholds.get("image"):
        raise IncompatibleModelError(f"model {product} {version} has no calibrated threshold; retrain it")
    if device is not None:
        model = cached_model(url, device)
        try:
            model.extractor()
        except ValueError as exc:  # the backbone or its weights differ from the model's
            raise IncompatibleModelError(f"model {product} {version} cannot be served: {exc}") from exc
    return ResolvedModel(version=version, url=url, backbone=config.backbone, image_threshold=float(thresholds["image"]))


def plan_scoring(uris: Sequence[str], already_scored: set[str], shard_size: int) -> tuple[list[list[str]], list[str]]:
    """Drop already-scored images and split the rest into shards.

    Args:
        uris: Listed images.
        already_scored: URIs with an ``ok`` report row for this model version.
        shard_size: Images per shard.

    Returns:
        ``(shards, skipped)``.
    """
    todo = [u for u in uris if u not in already_scored]
    skipped = [u for u in uris if u in already_scored]
    return [todo[i : i + shard_size] for i in range(0, len(todo), shard_size)], skipped


_MODELS: dict[tuple[str, str], PadimModel] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(url: str, device: str) -> PadimModel:
    """Load a model version once per process (verified), then reuse it.

    Args:
        url: Version folder URL.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        The model on the device.
    """
    resolved = str(resolve_device(device))
    key = (url, resolved)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = load_model(url, device=resolved)
        return _MODELS[key]


def heatmap_url(store: ModelStore, product: str, day: date, version: str, sha256: str) -> str:
    """Where the heat map of an image is written.

    Args:
        store: Model store.
        product: Product name.
        day: Production date.
        version: Model version.
        sha256: Image content hash.

    Returns:
        ``<store>/<product>/heatmaps/<date>/<version>/<sha256[:20]>.png``.
    """
    return store.artifact_url(product, "heatmaps", day.isoformat(), version, f"{sha256[:20]}.png")


def render_heatmap(model: PadimModel, scored: ScoredImage) -> bytes:
    """PNG bytes of the heat-map overlay of a scored image at its original size.

    Args:
        model: The model that scored it.
        scored: The result, with its anomaly map kept.

    Returns:
        PNG-encoded overlay.
    """
    from padim.visualize import overlay_heatmap

    if scored.anomaly_map is None:
        raise ValueError("the anomaly map of this image was not kept")
    record = scored.record
    image = load_pil(record.uri)
    full = map_to_original(torch.from_numpy(scored.anomaly_map), image.width, image.height, model.config)
    thresholds = model.thresholds
    pixel = thresholds.pixel if thresholds is not None else None
    vmax = max(float(full.max()), thresholds.image if thresholds is not None else 0.0)
    vmin = 0.5 * pixel if pixel is not None else float(full.min())
    overlay = overlay_heatmap(image, full.numpy(), pixel, vmin, vmax)
    buffer = io.BytesIO()
    overlay.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def score_shard(
    store: ModelStore,
    product: str,
    model_url: str,
    version: str,
    uris: Sequence[str],
    day: date,
    run_id: str,
    settings: ScoreSettings,
) -> ShardReport:
    """Score one shard and write its report rows (and heat maps) to the store.

    Every URI gets exactly one report row: ``ok`` with its scores, or ``error`` with a reason.

    Args:
        store: Model store (its root also holds the reports).
        product: Product name.
        model_url: Version folder URL.
        version: Version name.
        uris: The shard's images.
        day: Production date (report partition).
        run_id: Identifier of the run (written in every row and in the file name).
        settings: Batch size, device, heat maps.

    Returns:
        Counts, the written files and the top anomalies.
    """
    model = cached_model(model_url, settings.device)
    if model.thresholds is None:
        raise IncompatibleModelError(f"model {product} {version} has no calibrated threshold; retrain it")
    report = ShardReport(n_images=len(uris))
    rows: list[dict[str, Any]] = []
    keep = "anomalous" if settings.heatmaps else "none"
    batch_size = settings.batch_size or auto_batch_size(model.config, model.mean.device)
    for scored in score_images(model, uris, batch_size=batch_size, keep_maps=keep, description="score"):
        rows.append(_row_of(store, product, model, version, day, run_id, scored, report))
    if rows:
        report.report_files = write_report_rows(store.root, rows, run_id=run_id)
    return report


def _row_of(
    store: ModelStore,
    product: str,
    model: PadimModel,
    version: str,
    day: date,
    run_id: str,
    scored: ScoredImage,
    report: ShardReport,
) -> dict[str, Any]:
    """Report row of one result (writing its heat map first when anomalous)."""
    record = scored.record
    complete = record.width is not None and record.height is not None and scored.threshold is not None
    if not scored.ok or not complete:
        report.n_errors += 1
        return make_error_row(
            product=product,
            date=day,
            run_id=run_id,
            image_uri=record.uri,
            model_version=version,
            error=record.error or "not scored (no size or threshold)",
            backbone=model.config.backbone,
            image_sha256=record.sha256,
            width=record.width,
            height=record.height,
        )
    heatmap = None
    if scored.anomaly_map is not None and record.sha256:
        try:
            heatmap = heatmap_url(store, product, day, version, record.sha256)
            write_bytes_atomic(heatmap, render_heatmap(model, scored))
        except (OSError, PadimError, ValueError):
            heatmap = None  # a heat map is a convenience: never lose the score over it
    report.n_scored += 1
    report.n_anomalies += int(bool(scored.is_anomaly))
    report.normalized_scores.append(float(scored.normalized_score or 0.0))
    row = make_ok_row(
        product=product,
        date=day,
        run_id=run_id,
        image_uri=record.uri,
        image_sha256=record.sha256 or "",
        width=int(record.width),
        height=int(record.height),
        model_version=version,
        backbone=model.config.backbone,
        score=float(scored.score or 0.0),
        threshold=float(scored.threshold),
        defect_area_fraction=float(scored.defect_area_fraction or 0.0),
        max_x=scored.max_x or 0,
        max_y=scored.max_y or 0,
        is_anomaly=scored.is_anomaly,
        heatmap_uri=heatmap,
    )
    _keep_top(report.top, row)
    return row


def _keep_top(top: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """Keep the ``TOP_ANOMALIES`` highest-scoring rows, highest first."""
    top.append({k: row[k] for k in ("image_uri", "score", "normalized_score", "is_anomaly", "heatmap_uri")})
    top.sort(key=lambda r: r["score"], reverse=True)
    del top[TOP_ANOMALIES:]


def merge_top(reports: Sequence[ShardReport], n: int = TOP_ANOMALIES) -> list[dict[str, Any]]:
    """Top anomalies across shards.

    Args:
        reports: Shard reports.
        n: How many to keep.

    Returns:
        Rows, highest score first.
    """
    rows = [row for r in reports for row in r.top]
    return sorted(rows, key=lambda r: r["score"], reverse=True)[:n]


def check_drift(
    normalized_scores: Sequence[float], image_fpr: float, normal_median_ratio: float | None, settings: ScoreSettings
) -> DriftResult:
    """Decide whether tonight's scores drifted from the model's calibration.

    Two bounds: the share of images above the threshold (expected: the calibrated FPR), and the
    median score over the held-out normal images' median (the bulk of production moving).

    Args:
        normalized_scores: ``score / threshold`` of tonight's scored images.
        image_fpr: The model's calibrated false-positive rate.
        normal_median_ratio: Calibration median score over the threshold (``None`` if unknown).
        settings: Bounds.

    Returns:
        The decision and the figures behind it.
    """
    values = np.asarray(normalized_scores, dtype=np.float64)
    n = int(values.size)
    rate = float((values > 1.0).mean()) if n else 0.0
    max_rate = settings.drift_max_anomaly_rate or max(5.0 * image_fpr, 0.1)
    ratio = None
    if n and normal_median_ratio:
        ratio = float(np.median(values) / normal_median_ratio)
    reasons = []
    if n >= settings.drift_min_images:
        if rate > max_rate:
            reasons.append(f"anomaly rate {rate:.1%} above the bound {max_rate:.1%}")
        if ratio is not None and ratio > settings.drift_max_median_ratio:
            reasons.append(
                f"median score {ratio:.2f}x the calibration median (bound {settings.drift_max_median_ratio}x)"
            )
    return DriftResult(
        detected=bool(reasons),
        anomaly_rate=rate,
        max_anomaly_rate=max_rate,
        median_ratio=ratio,
        max_median_ratio=settings.drift_max_median_ratio,
        n_scored=n,
        reasons=reasons,
    )
