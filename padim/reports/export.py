"""Render report query results as a text table, CSV, JSON or Parquet.

JSON is one array of row objects whose keys are the DataFrame's column names (for report rows,
the report schema's column names): dates as ``"YYYY-MM-DD"``, timestamps in ISO 8601, missing
values and NaN as ``null``.
"""

from __future__ import annotations

import io
import json
import math
from datetime import date, datetime
from typing import Any, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from padim.io import fsio
from padim.reports import schema as report_schema
from padim.reports.schema import SUMMARY_SCHEMA
from padim.settings import ExportFormat

__all__ = ["TABLE_COLUMNS", "export", "to_json_records"]

EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)

TABLE_COLUMNS: tuple[str, ...] = (
    "date",
    "product",
    "image_uri",
    "model_version",
    "score",
    "normalized_score",
    "is_anomaly",
    "defect_area_fraction",
    "status",
    "error",
)
"""Columns the text table shows for report rows (CSV, JSON and Parquet keep every column)."""


def export(df: pd.DataFrame, format: ExportFormat, output: str | None = None) -> str | None:
    """Render a query result in one of the export formats.

    Args:
        df: A DataFrame from :func:`~padim.reports.query_reports` or
            :func:`~padim.reports.daily_summary` (any DataFrame works).
        format: ``"table"`` (fixed-width text; report rows show :data:`TABLE_COLUMNS`),
            ``"csv"``, ``"json"`` (one array of row objects) or ``"parquet"``.
        output: File path or URL (e.g. ``s3://...``) to write to; None returns the text instead.

    Returns:
        The rendered text when ``output`` is None, else None.

    Raises:
        ValueError: On an unknown format, or ``"parquet"`` without ``output``.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {list(EXPORT_FORMATS)}")
    if format == "parquet":
        if output is None:
            raise ValueError("parquet export needs an output path")
        fsio.write_bytes_atomic(output, to_parquet_bytes(df))
        return None
    renderers = {"table": to_text_table, "csv": to_csv_text, "json": to_json_text}
    text = renderers[format](df)
    if output is None:
        return text
    fsio.write_bytes_atomic(output, text.encode("utf-8"))
    return None


def to_json_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Convert a DataFrame to JSON-ready row dicts (ISO dates and timestamps, null for missing).

    Args:
        df: Any DataFrame.

    Returns:
        One dict per row, keys in column order.
    """
    columns = {name: [_json_value(v) for v in df[name].astype(object).tolist()] for name in df.columns}
    names = [str(name) for name in df.columns]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def to_json_text(df: pd.DataFrame) -> str:
    """Render a DataFrame as one JSON array of row objects.

    Args:
        df: Any DataFrame.

    Returns:
        The JSON text, ending with a newline.
    """
    return json.dumps(to_json_records(df), allow_nan=False, ensure_ascii=False) + "\n"


def to_csv_text(df: pd.DataFrame) -> str:
    """Render a DataFrame as CSV with a header, ISO timestamps and empty cells for missing values.

    Args:
        df: Any DataFrame.

    Returns:
        The CSV text.
    """
    return _with_iso_timestamps(df).to_csv(index=False)


def to_text_table(df: pd.DataFrame) -> str:
    """Render a DataFrame as readable fixed-width text.

    Report rows show :data:`TABLE_COLUMNS` only; floats get 4 decimals.

    Args:
        df: Any DataFrame.

    Returns:
        The table text, or ``"(no rows)"`` when empty, ending with a newline.
    """
    if df.empty:
        return "(no rows)\n"
    shown = df
    if set(report_schema.REPORT_SCHEMA.names) <= set(df.columns):
        shown = df[list(TABLE_COLUMNS)]
    text = _with_iso_timestamps(shown).to_string(index=False, na_rep="", float_format=lambda v: f"{v:.4f}")
    return text + f"\n({len(df)} {'row' if len(df) == 1 else 'rows'})\n"


def to_parquet_bytes(df: pd.DataFrame) -> bytes:
    """Encode a DataFrame as a zstd Parquet file, with the report or summary schema when it fits.

    Args:
        df: Any DataFrame.

    Returns:
        The Parquet file's bytes.
    """
    table = pa.Table.from_pandas(df, preserve_index=False)
    for schema in (report_schema.REPORT_SCHEMA, SUMMARY_SCHEMA):
        if table.column_names == schema.names:
            table = table.cast(schema)
            break
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _with_iso_timestamps(df: pd.DataFrame) -> pd.DataFrame:
    """Return a copy whose datetime columns are ISO 8601 strings."""
    out = df.copy()
    for name in out.columns:
        if pd.api.types.is_datetime64_any_dtype(out[name]):
            out[name] = [_json_value(v) for v in out[name].astype(object).tolist()]
    return out


def _json_value(value: Any) -> Any:
    """Convert one cell to a JSON-compatible value."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
