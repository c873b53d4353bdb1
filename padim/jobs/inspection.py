"""The steps of a nightly inspection run, as plain functions the score flow composes.

1. :func:`resolve_model` finds the product's model version (the latest, or a given one) and
   checks the running code can serve it, before any image is read.
2. :func:`plan_scoring` splits the night's images into shards, each with the content hashes this
   model version already scored that night (from that night's report partition only).
3. :func:`score_shard` scores one shard through :func:`padim.jobs.engine.score_images`, skipping images
   already scored with the same content (re-runs add no rows; a file rewritten under the same name
   is scored again), writes heat maps of anomalous images and the shard's report file (one
   Parquet file, written atomically), and returns only counts and the top anomalies.
4. :func:`check_drift` compares tonight's scores with the model's calibration.

Models are loaded once per process into a small LRU (:func:`cached_model`) and shared by the
task threads: a loaded model is re-entrant (see :class:`padim.core.model.PadimModel`).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import numpy as np
import torch

from padim.core.execution import resolve_device
from padim.core.model import PadimModel
from padim.core.preprocessing import map_to_original
from padim.errors import IncompatibleModelError, PadimError
from padim.io.artifact import check_servable, load_model
from padim.io.fsio import write_bytes_atomic
from padim.io.loading import load_pil
from padim.io.store import ModelStore
from padim.jobs.engine import ScoredImage, score_images
from padim.reports import make_error_row, make_ok_row, write_report_rows
from padim.settings import RunnerSettings, ScoreSettings, default_of

TOP_ANOMALIES = 10


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
        n_skipped: Images this model version had already scored that night with the same content.
        n_anomalies: Images above the threshold.
        n_errors: Images that could not be scored (each still has a report row).
        report_files: Parquet files written.
        normalized_scores: ``score / threshold`` of every scored image (for the drift check).
        top: The shard's highest-scoring images (dicts with uri, score, heat map...).
    """

    n_images: int = 0
    n_scored: int = 0
    n_skipped: int = 0
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
    store: ModelStore,
    product: str,
    version: str | None = None,
    settings: ScoreSettings | None = None,
) -> ResolvedModel:
    """Find and check the model version to score with, before any image is read.

    With ``settings``, the model is also loaded into this process's cache (:func:`cached_model`)
    and its backbone attached: every file's checksum, the tensors' shapes against the
    configuration (input size, channels) and the backbone weights' identity are then checked
    here, once, rather than in the first score task after the images were listed and read.
    Tasks running in this process (the default thread runner) reuse the loaded model.

    Args:
        store: Model store.
        product: Product name.
        version: A version name, or ``None`` for the latest.
        settings: How the run scores (device, compute path, runtime) to load and check the whole
            model for; ``None`` checks only the manifest.

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
    if settings is not None:
        model = cached_model(url, settings)
        try:
            model.extractor()
        except ValueError as exc:  # the backbone or its weights differ from the model's
            raise IncompatibleModelError(f"model {product} {version} cannot be served: {exc}") from exc
    return ResolvedModel(version=version, url=url, backbone=config.backbone, image_threshold=float(thresholds["image"]))


def plan_scoring(
    uris: Sequence[str], scored: Mapping[str, str], shard_size: int
) -> list[tuple[list[str], dict[str, str]]]:
    """Split a night's images into shards, each with what this model version already scored.

    Args:
        uris: Listed images.
        scored: ``{uri: sha256}`` this model version scored ``ok`` that night
            (:func:`padim.reports.scored_contents`).
        shard_size: Images per shard.

    Returns:
        ``(uris, scored)`` per shard, ``scored`` restricted to the shard's URIs.
    """
    shards = [list(uris[i : i + shard_size]) for i in range(0, len(uris), shard_size)]
    return [(shard, {u: scored[u] for u in shard if u in scored}) for shard in shards]


_MODELS: OrderedDict[tuple[str, ...], PadimModel] = OrderedDict()
_MODELS_LOCK = threading.Lock()
MODEL_CACHE_SIZE: int = default_of(RunnerSettings, "model_cache")


def cached_model(url: str, settings: ScoreSettings) -> PadimModel:
    """Load a model version once per process (verified), then reuse it.

    The cache keeps the :data:`MODEL_CACHE_SIZE` most recently used versions (a version is a few
    hundred MB): a process that serves many products or versions does not grow without bound.
    A loaded model is shared by every thread that scores with it.

    Args:
        url: Version folder URL.
        settings: Device, compute path, backbone runtime and precision to score with.

    Returns:
        The model on the device.
    """
    device = str(resolve_device(settings.device))
    key = (url, device, settings.path, settings.runtime, settings.precision)
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        model = load_model(url, device=device)
        model.path, model.runtime, model.precision = settings.path, settings.runtime, settings.precision
        _MODELS[key] = model
        while len(_MODELS) > MODEL_CACHE_SIZE:
            _MODELS.popitem(last=False)
        return model


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
    from padim.reports.visualize import overlay_heatmap

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
    scored: Mapping[str, str] | None = None,
) -> ShardReport:
    """Score one shard and write its report rows (and heat maps) to the store.

    Every URI gets exactly one report row - ``ok`` with its scores, or ``error`` with a reason -
    unless this model version already scored the same content that night (``scored``).

    Args:
        store: Model store (its root also holds the reports).
        product: Product name.
        model_url: Version folder URL.
        version: Version name.
        uris: The shard's images.
        day: Production date (report partition).
        run_id: Identifier of the run (written in every row and in the file name).
        settings: Batch size, device, heat maps, compute path.
        scored: ``{uri: sha256}`` already scored that night by this version (see :func:`plan_scoring`).

    Returns:
        Counts, the written files and the top anomalies.

    Raises:
        ImageReadError: Storage could not deliver an image; no row of the shard is written.
    """
    model = cached_model(model_url, settings)
    if model.thresholds is None:
        raise IncompatibleModelError(f"model {product} {version} has no calibrated threshold; retrain it")
    report = ShardReport(n_images=len(uris))
    rows: list[dict[str, Any]] = []
    keep = "anomalous" if settings.heatmaps else "none"
    known = dict(scored or {})
    skip = (lambda uri, sha256: known.get(uri) == sha256) if known else None
    for result in score_images(model, uris, batch_size=settings.batch_size, keep_maps=keep, skip=skip):
        if result.skipped:
            report.n_skipped += 1
            continue
        rows.append(_row_of(store, product, model, version, day, run_id, result, report))
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
