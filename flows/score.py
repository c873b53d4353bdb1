"""The score flow: the nightly inspection of one product's new production images."""

from __future__ import annotations

from typing import Any

from padim_prefect.flows.naming import score_run_name
from padim_prefect.flows.params import check_folder, check_outside_store, check_product, open_store, parse_day
from padim_prefect.flows.runners import task_runner_from_env
from padim_prefect.flows.train import artifact_key, run_id
from padim_prefect.tasks.events import DRIFT_DETECTED, INSPECTION_COMPLETED, emit_event_task, publish_artifacts_task
from padim_prefect.tasks.policy import RESULT_OPTIONS
from padim_prefect.tasks.scoring import already_scored_task, compact_partition_task, score_shard_task
from padim_prefect.tasks.storage import list_images_task
from prefect import flow, get_run_logger

from padim.errors import IncompleteRunError
from padim.io.fsio import browser_url
from padim.jobs.inspection import ShardReport, check_drift, merge_top, plan_scoring, resolve_model
from padim.settings import (
    HEATMAP_ARTIFACTS,
    HEATMAP_LINK_EXPIRY_S,
    Precision,
    Runtime,
    ScoreSettings,
    TrainSettings,
    default_of,
)


def heatmap_cell(row: dict[str, Any]) -> str:
    """A top anomaly's heat-map cell: a link a browser opens, else the stored file's name."""
    if row.get("heatmap_link"):
        return f"[heat map]({row['heatmap_link']})"
    if row.get("heatmap_uri"):
        return f"`{row['heatmap_uri']}`"
    return "-"


def link_heatmaps(top: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Give the top anomalies browser links to their heat maps where the store can make them.

    Args:
        top: The run's highest-scoring rows (changed in place: ``heatmap_link`` added).

    Returns:
        ``(description, URL)`` of the first :data:`HEATMAP_ARTIFACTS` anomalies with a link, for
        image artifacts; empty for a local store (a browser cannot open its files).
    """
    images = []
    for row in top:
        link = browser_url(row["heatmap_uri"], HEATMAP_LINK_EXPIRY_S) if row.get("heatmap_uri") else None
        row["heatmap_link"] = link
        if link and row.get("is_anomaly") and len(images) < HEATMAP_ARTIFACTS:
            images.append((f"heat map of {row['image_uri']} (score {row['score']:.3f})", link))
    return images


def summarise_run(
    summary: dict[str, Any], top: list[dict[str, Any]], not_scored: list[dict[str, Any]] | None = None
) -> str:
    """Markdown summary of a score run, with the top anomalies and links to their heat maps."""
    lines = [
        f"# Inspection {summary['product']} {summary['date']}",
        "",
        f"Model version **{summary['model_version']}**, images from `{summary['images_url']}`.",
        "",
        "| images | scored | skipped (already scored) | anomalies | errors | not scored (storage faults) |",
        "|---|---|---|---|---|---|",
        f"| {summary['n_images']} | {summary['n_scored']} | {summary['n_skipped']} | "
        f"{summary['n_anomalies']} | {summary['n_errors']} | {summary['n_not_scored']} |",
        "",
    ]
    for failure in not_scored or []:
        lines.append(f"**Not scored:** {failure['n_images']} images from {failure['first_uri']}: {failure['reason']}")
    if not_scored:
        lines.append("")
    drift = summary.get("drift") or {}
    if drift.get("detected"):
        lines += [f"**Drift detected:** {'; '.join(drift.get('reasons', []))}", ""]
    if top:
        lines += [
            "## Top anomalies",
            "",
            "| image | score | normalised | anomaly | heat map |",
            "|---|---|---|---|---|",
        ]
        for row in top:
            link = heatmap_cell(row)
            lines.append(
                f"| {row['image_uri']} | {row['score']:.3f} | {row['normalized_score']:.2f} | "
                f"{'yes' if row['is_anomaly'] else 'no'} | {link} |"
            )
    return "\n".join(lines)


@flow(
    name="padim-score",
    flow_run_name=score_run_name,
    **RESULT_OPTIONS,
    task_runner=task_runner_from_env(),
    validate_parameters=True,
)
def score(
    product: str,
    images_url: str,
    store: str | None = None,
    date: str | None = None,
    version: str | None = None,
    batch_size: int | None = default_of(ScoreSettings, "batch_size"),
    device: str = default_of(ScoreSettings, "device"),
    shard_size: int = default_of(ScoreSettings, "shard_size"),
    heatmaps: bool = default_of(ScoreSettings, "heatmaps"),
    drift_min_images: int = default_of(ScoreSettings, "drift_min_images"),
    drift_max_anomaly_rate: float | None = default_of(ScoreSettings, "drift_max_anomaly_rate"),
    drift_max_median_ratio: float = default_of(ScoreSettings, "drift_max_median_ratio"),
    runtime: Runtime = default_of(ScoreSettings, "runtime"),
    precision: Precision = default_of(ScoreSettings, "precision"),
) -> dict[str, Any]:
    """Score a night of production images into the Parquet report.

    Images this model version already scored that night with the same content are skipped, so
    a re-run adds no rows; a file rewritten under the same name is scored again. Every default
    comes from :class:`padim.settings.ScoreSettings`. When storage fails while a shard is read
    (after the task's retries), the other shards are still scored and written, and the run then
    fails, naming the images it could not score; re-running the night scores only those.

    Args:
        product: Product name.
        images_url: Folder (local or ``s3://``) of the night's images.
        store: Store root; default ``$PADIM_STORE`` or ``./padim-store``.
        date: Production date ``YYYY-MM-DD`` (report partition); default today (UTC).
        version: Model version; default the latest.
        batch_size: Images per backbone batch; ``None`` fits the device.
        device: ``auto``, ``cpu`` or ``cuda``.
        shard_size: Images per score task.
        heatmaps: Write heat maps of anomalous images.
        drift_min_images: Fewest scored images for a drift decision.
        drift_max_anomaly_rate: Anomaly rate above which the night drifted (``None``: from the
            model's calibrated false-positive rate).
        drift_max_median_ratio: Tonight's median score over the calibration median above which
            the night drifted.
        runtime: Where the backbone runs: ``auto`` (OpenVINO on a CPU when installed), ``torch``
            or ``openvino``.
        precision: Arithmetic of the OpenVINO backbone: ``f32`` or ``bf16``.

    Returns:
        Counts (images, scored, skipped, anomalies, errors), the model version, the drift
        decision and the report files.

    Raises:
        IncompleteRunError: Some shards could not be scored (storage faults); the rest were.
    """
    logger = get_run_logger()
    check_product(product)
    day = parse_day(date)
    settings = ScoreSettings(
        batch_size=batch_size,
        device=device,
        shard_size=shard_size,
        heatmaps=heatmaps,
        drift_min_images=drift_min_images,
        drift_max_anomaly_rate=drift_max_anomaly_rate,
        drift_max_median_ratio=drift_max_median_ratio,
        runtime=runtime,
        precision=precision,
    )
    model_store = open_store(store)
    model = resolve_model(model_store, product, version, settings)
    check_outside_store(check_folder(images_url, "production images"), model_store, "production images")
    uris = list_images_task(images_url)
    done = already_scored_task(model_store.root, product, model.version, day)
    plan = plan_scoring(uris, done, settings.shard_size)
    logger.info("%s: %d images, %d scored by %s before tonight's run", product, len(uris), len(done), model.version)
    rid = run_id()
    futures = [
        score_shard_task.submit(model_store.root, product, model.url, model.version, shard, day, rid, settings, known)
        for shard, known in plan
    ]
    reports: list[ShardReport] = []
    not_scored: list[dict[str, Any]] = []
    for (shard, _), future in zip(plan, futures, strict=True):
        try:
            reports.append(future.result())
        except Exception as exc:  # the other shards' rows stand; the run fails at the end
            logger.error("%s: %d images not scored (from %s): %s", product, len(shard), shard[0], exc)
            not_scored.append({"n_images": len(shard), "first_uri": shard[0], "reason": str(exc), "uris": shard})
    report_files = [f for r in reports for f in r.report_files]
    try:  # the rows are already safe in the shard files; compaction only speeds up queries
        # Every run compacts, also one that wrote nothing: a compaction that failed before is retried.
        compacted = compact_partition_task(model_store.root, product, day)
        report_files = [compacted] if compacted and report_files else report_files
    except Exception as exc:
        logger.warning("%s: could not compact the report partition of %s (the next run retries): %s", product, day, exc)
    manifest_thresholds = model_store.read_manifest(product, model.version).get("thresholds") or {}
    median = manifest_thresholds.get("normal_median")
    drift = check_drift(
        [s for r in reports for s in r.normalized_scores],
        float(manifest_thresholds.get("image_fpr", default_of(TrainSettings, "image_fpr"))),
        median / model.image_threshold if median else None,
        settings,
    )
    summary: dict[str, Any] = {
        "product": product,
        "date": day.isoformat(),
        "images_url": images_url,
        "model_version": model.version,
        "n_images": len(uris),
        "n_skipped": sum(r.n_skipped for r in reports),
        "n_scored": sum(r.n_scored for r in reports),
        "n_anomalies": sum(r.n_anomalies for r in reports),
        "n_errors": sum(r.n_errors for r in reports),
        "n_not_scored": sum(f["n_images"] for f in not_scored),
        "report_files": report_files,
        "drift": {
            "detected": drift.detected,
            "reasons": drift.reasons,
            "anomaly_rate": drift.anomaly_rate,
            "median_ratio": drift.median_ratio,
        },
    }
    top = merge_top(reports)
    images = link_heatmaps(top)
    key = artifact_key("inspection", product)
    publish_artifacts_task(key, summarise_run(summary, top, not_scored), top, images)
    if not_scored:
        first = not_scored[0]
        raise IncompleteRunError(
            f"{summary['n_not_scored']} of {len(uris)} images of {product} on {day} were not scored "
            f"(storage failed after retries, e.g. {first['first_uri']}: {first['reason']}); the other "
            f"{summary['n_scored'] + summary['n_errors']} rows are written. Re-run the night to score the rest."
        )
    payload = {k: summary[k] for k in ("date", "model_version", "n_images", "n_scored", "n_anomalies", "n_errors")}
    emit_event_task(INSPECTION_COMPLETED, product, payload)
    if drift.detected:
        logger.warning("%s: drift detected: %s", product, "; ".join(drift.reasons))
        emit_event_task(DRIFT_DETECTED, product, {**payload, "reasons": drift.reasons})
    summary["top"] = top
    return summary
