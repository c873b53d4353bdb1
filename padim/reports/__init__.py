"""Parquet score reports: schema, writer, DuckDB queries, and the heat-map pictures they link to.

One row per scored image (or per image that failed), hive-partitioned by product and date under
``<store>/reports/`` on local disk or S3. See ``docs/reports.md``.

Example:
    >>> rows = [make_ok_row(product="bottle", date="2026-11-24", run_id="r1", ...)]  # doctest: +SKIP
    >>> write_report_rows("padim-store", rows, run_id="r1")  # doctest: +SKIP
    >>> query_reports("padim-store", product="bottle", anomalies_only=True, top=10)  # doctest: +SKIP
"""

from __future__ import annotations

from padim.reports.errors import CorruptReportError, ReportQueryError
from padim.reports.export import export
from padim.reports.layout import ReportFile, list_report_files
from padim.reports.query import daily_summary, query_reports, scored_contents, scored_images
from padim.reports.rows import ReportRows, make_error_row, make_ok_row, to_report_table
from padim.reports.schema import (
    DEDUP_KEY,
    REPORT_COLUMNS,
    REPORT_SCHEMA,
    REPORT_SCHEMA_VERSION,
    SUMMARY_SCHEMA,
    check_additive_evolution,
)
from padim.reports.screening import quarantine_corrupt_reports
from padim.reports.writer import compact_partition, compact_reports, write_report_rows

__all__ = [
    "DEDUP_KEY",
    "REPORT_COLUMNS",
    "REPORT_SCHEMA",
    "REPORT_SCHEMA_VERSION",
    "SUMMARY_SCHEMA",
    "CorruptReportError",
    "ReportFile",
    "ReportQueryError",
    "ReportRows",
    "check_additive_evolution",
    "compact_partition",
    "compact_reports",
    "daily_summary",
    "export",
    "list_report_files",
    "make_error_row",
    "make_ok_row",
    "quarantine_corrupt_reports",
    "query_reports",
    "scored_contents",
    "scored_images",
    "to_report_table",
    "write_report_rows",
]
