"""``padim report``: query the Parquet score reports (rows, top anomalies, daily summaries).

DuckDB and pandas (:mod:`padim.reports`) are imported only when the command runs.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated

import typer

from padim_cli.options import ProductFilterOpt, ReportFormat, StoreOpt
from padim_cli.runner import check_product, check_store_exists, iso_day, resolve_store

__all__ = ["report"]


def report(
    store: StoreOpt = None,
    product: ProductFilterOpt = None,
    since: Annotated[
        datetime | None,
        typer.Option(
            "--since", formats=["%Y-%m-%d"], metavar="YYYY-MM-DD", help="First date, inclusive.", show_default=False
        ),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(
            "--until", formats=["%Y-%m-%d"], metavar="YYYY-MM-DD", help="Last date, inclusive.", show_default=False
        ),
    ] = None,
    min_score: Annotated[
        float | None,
        typer.Option("--min-score", metavar="X", help="Only rows whose raw score is at least X.", show_default=False),
    ] = None,
    anomalies: Annotated[bool, typer.Option("--anomalies", help="Only anomalous images.")] = False,
    top: Annotated[
        int | None,
        typer.Option(
            "--top", min=1, metavar="N", help="The N highest-scoring rows, highest first.", show_default=False
        ),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", metavar="V", help="Only rows scored by this model version.", show_default=False),
    ] = None,
    summary: Annotated[
        bool,
        typer.Option(
            "--summary", help="One row per product and day: images, anomalies, rate, errors, score percentiles."
        ),
    ] = False,
    output_format: Annotated[
        ReportFormat, typer.Option("--format", "-f", help="Output format.", case_sensitive=False)
    ] = ReportFormat.table,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write to a file (or s3:// URL) instead of the terminal.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Query the Parquet score reports: filter rows, top anomalies, daily summaries.

    Reads `<store>/reports/` (hive-partitioned by product and date, local or S3), keeps one row
    per image and model version, and prints a table, CSV, JSON (one array of row objects keyed by
    the report's column names) or writes Parquet. The table shows the main columns; CSV, JSON and
    Parquet have every column.

    Examples:

    \b
        padim report --product bottle --since 2026-11-01 --anomalies
        padim report --top 20 --format csv --output top20.csv
        padim report --summary --format json
        padim report --store s3://padim/store --min-score 50 --format parquet --output high.parquet
    """
    from padim.reports import daily_summary, export, query_reports

    if summary and (anomalies or top is not None or min_score is not None):
        raise typer.BadParameter(
            "--summary cannot be combined with --anomalies, --top or --min-score", param_hint="--summary"
        )
    if output_format is ReportFormat.parquet and not output:
        raise typer.BadParameter("--format parquet needs --output FILE", param_hint="--format")
    root = check_store_exists(resolve_store(store))
    if product is not None:
        check_product(product)
    window = {
        "product": product,
        "since": iso_day(since.date() if since else None),
        "until": iso_day(until.date() if until else None),
        "model_version": version,
    }
    if summary:
        frame = daily_summary(root, **window)
    else:
        frame = query_reports(root, **window, min_score=min_score, anomalies_only=anomalies, top=top)
    text = export(frame, output_format.value, output)  # type: ignore[arg-type]
    if text is not None:
        sys.stdout.write(text)
    else:
        print(f"Wrote {len(frame)} rows to {output}", file=sys.stderr)
