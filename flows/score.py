"""The score flow: the nightly inspection of one product's new production images."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.params import check_folder, check_product, open_store, parse_day
from flows.runners import task_runner_from_env
from flows.train import artifact_key, run_id
from padim.inspection import ScoreSettings, check_drift, merge_top, plan_scoring, resolve_model
from tasks.events import DRIFT_DETECTED, INSPECTION_COMPLETED, emit_event_task, publish_artifacts_task
from tasks.scoring import already_scored_task, compact_partition_task, score_shard_task
from tasks.storage import list_images_task


def summarise_run(summary: dict[str, Any], top: list[dict[str, Any]]) -> str:
    """Markdown summary of a score run, with the top anomalies and links to their heat maps."""
    lines = [
        f"# Inspection {summary['product']} {summary['date']}",
        "",
        f"Model version **{summary['model_version']}**, images from `{summary['images_url']}`.",
        "",
        "| images | scored | skipped (already scored) | anomalies | errors |",
        "|---|---|---|---|---|",
        f"| {summary['n_images']} | {summary['n_scored']} | {summary['n_skipped']} | "
        f"{summary['n_anomalies']} | {summary['n_errors']} |",
        "",
    ]
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
            link = f"[heat map]({row['heatmap_uri']})" if row.get("heatmap_uri") else "-"
            lines.append(
                f"| {row['image_uri']} | {row['score']:.3f} | {row['normalized_score']:.2f} | "
                f"{'yes' if row['is_anomaly'] else 'no'} | {link} |"
            )
    return "\n".join(lines)


@flow(name="padim-score", task_runner=task_runner_from_env(), validate_parameters=True)
def score(
    product: str,
    images_url: str,
    store: str | None = None,
    date: str | None = None,
    version: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    shard_size: int = 500,
    heatmaps: bool = True,
) -> dict[str, Any]:
    """Score a night of production images into the Parquet report.

    Images this model version has already scored are skipped, so a re-run adds no rows.

    Args:
        product: Product name.
        images_url: Folder (local or ``s3://``) of the night's images.
        store: Store root; default ``$PADIM_STORE`` or ``./padim-store``.
        date: Production date ``YYYY-MM-DD`` (report partition); default today (UTC).
        version: Model version; default the latest.
        batch_size: Images per backbone batch (default: 32 on a CPU, more on a GPU).
        device: ``auto``, ``cpu`` or ``cuda``.
        shard_size: Images per score task.
        heatmaps: Write heat maps of anomalous images.

    Returns:
        Counts (images, scored, skipped, anomalies, errors), the model version, the drift
        decision and the report files.
    """
    logger = get_run_logger()
    check_product(product)
    day = parse_day(date)
    settings = ScoreSettings(batch_size=batch_size, device=device, shard_size=shard_size, heatmaps=heatmaps)
    model_store = open_store(store)
    model = resolve_model(model_store, product, version, device=settings.device)
    check_folder(images_url, "production images")
    uris = list_images_task(images_url)
    done = already_scored_task(model_store.root, product, model.version)
    shards, skipped = plan_scoring(uris, done, settings.shard_size)
    logger.info("%s: %d images, %d already scored by %s", product, len(uris), len(skipped), model.version)
    rid = run_id()
    futures = [
        score_shard_task.submit(model_store.root, product, model.url, model.version, shard, day, rid, settings)
        for shard in shards
    ]
    reports = [future.result() for future in futures]
    report_files = [f for r in reports for f in r.report_files]
    if reports:
        try:  # the rows are already safe in the shard files; compaction only speeds up queries
            compacted = compact_partition_task(model_store.root, product, day)
            report_files = [compacted] if compacted else report_files
        except Exception as exc:
            logger.warning("%s: could not compact the report partition of %s: %s", product, day, exc)
    manifest_thresholds = model_store.read_manifest(product, model.version).get("thresholds") or {}
    median = manifest_thresholds.get("normal_median")
    drift = check_drift(
        [s for r in reports for s in r.normalized_scores],
        float(manifest_thresholds.get("image_fpr", 0.01)),
        median / model.image_threshold if median else None,
        settings,
    )
    summary: dict[str, Any] = {
        "product": product,
        "date": day.isoformat(),
        "images_url": images_url,
        "model_version": model.version,
        "n_images": len(uris),
        "n_skipped": len(skipped),
        "n_scored": sum(r.n_scored for r in reports),
        "n_anomalies": sum(r.n_anomalies for r in reports),
        "n_errors": sum(r.n_errors for r in reports),
        "report_files": report_files,
        "drift": {
            "detected": drift.detected,
            "reasons": drift.reasons,
            "anomaly_rate": drift.anomaly_rate,
            "median_ratio": drift.median_ratio,
        },
    }
    top = merge_top(reports)
    payload = {k: summary[k] for k in ("date", "model_version", "n_images", "n_scored", "n_anomalies", "n_errors")}
    emit_event_task(INSPECTION_COMPLETED, product, payload)
    if drift.detected:
        logger.warning("%s: drift detected: %s", product, "; ".join(drift.reasons))
        emit_event_task(DRIFT_DETECTED, product, {**payload, "reasons": drift.reasons})
    publish_artifacts_task(artifact_key("inspection", product), summarise_run(summary, top), top)
    summary["top"] = top
    return summary
