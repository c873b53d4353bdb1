"""Tasks of the score flow."""

from __future__ import annotations

from datetime import date

from padim_prefect.tasks.policy import TASK_OPTIONS
from prefect import get_run_logger, task

from padim.io.store import ModelStore
from padim.jobs.inspection import ShardReport, score_shard
from padim.reports import compact_partition, scored_contents
from padim.settings import ScoreSettings


@task(name="already-scored", **TASK_OPTIONS)
def already_scored_task(store_url: str, product: str, version: str, day: date) -> dict[str, str]:
    """What this model version already scored that night (for idempotent re-runs).

    Args:
        store_url: Store root (holds the reports).
        product: Product name.
        version: Model version.
        day: Production date (only its report partition is read).

    Returns:
        ``{image_uri: image_sha256}`` of the night's ``ok`` rows.
    """
    return scored_contents(store_url, product, version, day)


@task(name="score-shard", **TASK_OPTIONS)
def score_shard_task(
    store_url: str,
    product: str,
    model_url: str,
    version: str,
    uris: list[str],
    day: date,
    run_id: str,
    settings: ScoreSettings,
    scored: dict[str, str] | None = None,
) -> ShardReport:
    """Score one shard and write its report file and heat maps.

    Args:
        store_url: Store root.
        product: Product name.
        model_url: Version folder URL.
        version: Version name.
        uris: The shard's images.
        day: Production date.
        run_id: Run identifier.
        settings: Score options.
        scored: ``{uri: sha256}`` already scored that night by this version (skipped when unchanged).

    Returns:
        Counts, files and top anomalies (no tensors).
    """
    report = score_shard(ModelStore(store_url), product, model_url, version, uris, day, run_id, settings, scored)
    get_run_logger().info(
        "scored %d images: %d anomalies, %d errors, %d already scored",
        report.n_scored,
        report.n_anomalies,
        report.n_errors,
        report.n_skipped,
    )
    return report


@task(name="compact-report-partition", **TASK_OPTIONS)
def compact_partition_task(store_url: str, product: str, day: date) -> str | None:
    """Rewrite a night's report partition as one deduplicated file (queries read fewer files).

    Safe while other runs write: the new file is complete before any old one is deleted, and only
    the files it merged are deleted.

    Args:
        store_url: Store root.
        product: Product name.
        day: Production date.

    Returns:
        The partition's file, or ``None`` when it is empty.
    """
    return compact_partition(store_url, product, day)
