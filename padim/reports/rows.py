"""Build report rows and validate them against :data:`~padim.reports.schema.REPORT_SCHEMA`.

:func:`make_ok_row` and :func:`make_error_row` build one row as a ``dict`` in schema order;
:func:`to_report_table` turns rows (dicts, a pandas DataFrame or an Arrow table) into an Arrow
table of exactly the report schema, rejecting anything that would make a report wrong: unknown
columns, wrong types, missing required values, NaN or infinite scores, inconsistent status.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from padim.reports import schema as report_schema
from padim.reports.schema import (
    FINITE_COLUMNS,
    NULL_ON_ERROR_COLUMNS,
    REQUIRED_COLUMNS,
    SCORE_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    STATUSES,
    parse_report_date,
    validate_product,
)

__all__ = ["ReportRows", "make_error_row", "make_ok_row", "to_report_table"]

ReportRows = pa.Table | pd.DataFrame | Sequence[Mapping[str, Any]]
"""Anything :func:`to_report_table` accepts."""

_NORMALIZED_RTOL = 1e-9


def make_ok_row(
    *,
    product: str,
    date: date | str,
    run_id: str,
    image_uri: str,
    image_sha256: str,
    width: int,
    height: int,
    model_version: str,
    backbone: str,
    score: float,
    threshold: float,
    defect_area_fraction: float,
    max_x: int,
    max_y: int,
    is_anomaly: bool | None = None,
    heatmap_uri: str | None = None,
    scored_at: datetime | None = None,
) -> dict[str, Any]:
    """Build the report row of a successfully scored image.

    Args:
        product: Product name (partition key).
        date: Production night the image belongs to (partition key).
        run_id: Identifier of the scoring run (e.g. the flow run id).
        image_uri: URL of the scored image.
        image_sha256: Hex sha256 of the image file.
        width: Original image width in pixels.
        height: Original image height in pixels.
        model_version: Version of the product model that scored it.
        backbone: Backbone name of that model.
        score: Raw image score, the maximum of the anomaly map (Mahalanobis distance).
        threshold: The model's calibrated image threshold (> 0).
        defect_area_fraction: Share of pixels above the model's pixel threshold, in [0, 1].
        max_x: Column of the anomaly map maximum, in original image pixels.
        max_y: Row of the anomaly map maximum, in original image pixels.
        is_anomaly: The model's decision; default ``score > threshold``.
        heatmap_uri: URL of the saved heat map, if any.
        scored_at: Timezone-aware scoring time; default now (UTC).

    Returns:
        The row as a dict in schema order, with ``normalized_score = score / threshold``.

    Raises:
        ValueError: If a value is out of range (NaN score, non-positive threshold, ...).
    """
    score_value = _finite_float(score, "score")
    threshold_value = _finite_float(threshold, "threshold")
    if threshold_value <= 0.0:
        raise ValueError(f"threshold must be > 0 to normalise scores, got {threshold_value}")
    decision = score_value > threshold_value if is_anomaly is None else bool(is_anomaly)
    row = _base_row(product, date, run_id, image_uri, model_version, scored_at, STATUS_OK)
    row.update(
        image_sha256=image_sha256,
        width=int(width),
        height=int(height),
        backbone=backbone,
        score=score_value,
        threshold=threshold_value,
        normalized_score=score_value / threshold_value,
        is_anomaly=decision,
        defect_area_fraction=_finite_float(defect_area_fraction, "defect_area_fraction"),
        max_x=int(max_x),
        max_y=int(max_y),
        heatmap_uri=heatmap_uri,
    )
    return _in_schema_order(row)


def make_error_row(
    *,
    product: str,
    date: date | str,
    run_id: str,
    image_uri: str,
    model_version: str,
    error: str,
    backbone: str | None = None,
    image_sha256: str | None = None,
    width: int | None = None,
    height: int | None = None,
    scored_at: datetime | None = None,
) -> dict[str, Any]:
    """Build the report row of an image that could not be scored.

    Args:
        product: Product name (partition key).
        date: Production night the image belongs to (partition key).
        run_id: Identifier of the scoring run.
        image_uri: URL of the image.
        model_version: Version of the model the run used.
        error: Readable reason, e.g. ``"cannot decode image: truncated PNG"``.
        backbone: Backbone of the model, if known.
        image_sha256: Hex sha256 of the file, if it could be read.
        width: Image width, if known.
        height: Image height, if known.
        scored_at: Timezone-aware time of the attempt; default now (UTC).

    Returns:
        The row as a dict in schema order; score-related columns are None.

    Raises:
        ValueError: If ``error`` is empty or another value is invalid.
    """
    if not isinstance(error, str) or not error.strip():
        raise ValueError("an error row needs a non-empty error message")
    row = _base_row(product, date, run_id, image_uri, model_version, scored_at, STATUS_ERROR)
    row.update(
        image_sha256=image_sha256,
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        backbone=backbone,
        error=error,
    )
    return _in_schema_order(row)


def to_report_table(rows: ReportRows, *, run_id: str | None = None) -> pa.Table:
    """Convert and validate report rows into an Arrow table of exactly the report schema.

    Columns missing from ``rows`` become null (``run_id`` is filled from the argument). Integer
    columns accept integral floats (a pandas column with missing values is float); floats accept
    integers; ``date`` accepts dates or ISO strings; ``scored_at`` must be timezone-aware.

    Args:
        rows: Dicts (one per row), a pandas DataFrame or an Arrow table.
        run_id: If given, every row's ``run_id`` must equal it (missing ones are filled with it).

    Returns:
        A table with :data:`REPORT_SCHEMA` columns in order.

    Raises:
        ValueError: Unknown columns, wrong types, missing required values, NaN/inf in a score
            column, an invalid status or product, or score columns set on an error row.
    """
    schema = report_schema.REPORT_SCHEMA
    table = _as_arrow(rows)
    unknown = sorted(set(table.column_names) - set(schema.names))
    if unknown:
        raise ValueError(f"unknown report columns {unknown}; known columns are {list(schema.names)}")
    columns = [_conform_column(table, field, run_id) for field in schema]
    result = pa.Table.from_arrays(columns, schema=schema)
    _check_values(result, run_id)
    return result


def _base_row(
    product: str,
    day: date | str,
    run_id: str,
    image_uri: str,
    model_version: str,
    scored_at: datetime | None,
    status: str,
) -> dict[str, Any]:
    """Build the columns shared by ok and error rows."""
    when = datetime.now(timezone.utc) if scored_at is None else scored_at
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("scored_at must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return {
        "product": validate_product(product),
        "date": parse_report_date(day),
        "run_id": run_id,
        "scored_at": when.astimezone(timezone.utc),
        "image_uri": image_uri,
        "model_version": model_version,
        "status": status,
    }


def _in_schema_order(row: dict[str, Any]) -> dict[str, Any]:
    """Return a dict with every report column, in schema order (missing ones None)."""
    return {name: row.get(name) for name in report_schema.REPORT_SCHEMA.names}


def _finite_float(value: float, name: str) -> float:
    """Convert to float and reject NaN and infinities."""
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be a finite number, got {result}")
    return result


def _as_arrow(rows: ReportRows) -> pa.Table:
    """Turn any accepted row container into an Arrow table, inferring types."""
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pd.DataFrame):
        try:
            return pa.Table.from_pandas(rows, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"report rows cannot be converted to Arrow: {exc}") from None
    if isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)):
        return _table_from_records(rows)
    raise ValueError(
        f"report rows must be a pyarrow.Table, a pandas.DataFrame or a list of dicts, got {type(rows).__name__}"
    )


def _table_from_records(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a table from dicts, using the union of their keys (not only the first row's)."""
    names: dict[str, None] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"report row {index} is a {type(row).__name__}, expected a dict")
        names.update(dict.fromkeys(row))
    arrays = {}
    for name in names:
        values = [row.get(name) for row in rows]
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise ValueError(f"report column {name!r} has values of mixed or unsupported types: {exc}") from None
    return pa.table(arrays) if arrays else pa.table({})


def _conform_column(table: pa.Table, field: pa.Field, run_id: str | None) -> pa.ChunkedArray:
    """Return one schema column from ``table``, cast to the schema type when that is safe."""
    if field.name not in table.column_names:
        if field.name == "run_id" and run_id is not None:
            return pa.chunked_array([pa.array([run_id] * table.num_rows, pa.string())])
        return pa.chunked_array([pa.nulls(table.num_rows, field.type)])
    column = table.column(field.name)
    source = column.type
    if pa.types.is_dictionary(source):
        column = column.cast(source.value_type)
        source = column.type
    if source == field.type:
        return column
    if pa.types.is_timestamp(field.type) and pa.types.is_timestamp(source) and source.tz is None:
        raise ValueError(f"report column {field.name!r} must be timezone-aware (UTC), got a naive timestamp")
    if not _is_castable(source, field.type):
        raise ValueError(f"report column {field.name!r} must be {field.type}, got {source}")
    try:
        return column.cast(field.type, safe=not pa.types.is_timestamp(source))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"report column {field.name!r} cannot be converted to {field.type}: {exc}") from None


def _is_castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Tell whether ``source`` values may be converted to ``target`` without changing meaning."""
    if pa.types.is_null(source):
        return True
    if pa.types.is_string(target):
        return pa.types.is_string(source) or pa.types.is_large_string(source) or pa.types.is_string_view(source)
    if pa.types.is_floating(target):
        return pa.types.is_floating(source) or pa.types.is_integer(source)
    if pa.types.is_integer(target):
        return pa.types.is_integer(source) or pa.types.is_floating(source)
    if pa.types.is_boolean(target):
        return pa.types.is_boolean(source)
    if pa.types.is_date(target):
        return (
            pa.types.is_date(source)
            or pa.types.is_string(source)
            or pa.types.is_large_string(source)
            or (pa.types.is_timestamp(source) and source.tz is None)
        )
    if pa.types.is_timestamp(target):
        return pa.types.is_timestamp(source) and source.tz is not None
    return False


def _check_values(table: pa.Table, run_id: str | None) -> None:
    """Apply the row-level rules of the report schema."""
    status = table.column("status")
    _check_required(table)
    bad_status = sorted({s for s in pc.unique(status).to_pylist() if s not in STATUSES})
    if bad_status:
        raise ValueError(f"status must be 'ok' or 'error', got {bad_status}")
    for product in pc.unique(table.column("product")).to_pylist():
        validate_product(product)
    if run_id is not None:
        others = sorted(set(pc.unique(table.column("run_id")).to_pylist()) - {run_id})
        if others:
            raise ValueError(f"rows carry run_id {others} but are written by run {run_id!r}")
    _check_finite(table)
    is_ok = pc.equal(status, STATUS_OK)
    _check_ok_rows(table.filter(is_ok))
    _check_error_rows(table.filter(pc.invert(is_ok)))


def _check_required(table: pa.Table) -> None:
    """Reject nulls in columns every row must have."""
    for name in REQUIRED_COLUMNS:
        nulls = table.column(name).null_count
        if nulls:
            raise ValueError(f"report column {name!r} is required but {nulls} row(s) have no value")


def _check_finite(table: pa.Table) -> None:
    """Reject NaN and infinities in score columns."""
    for name in FINITE_COLUMNS:
        column = table.column(name)
        bad = pc.sum(pc.invert(pc.is_finite(column))).as_py() or 0
        if bad:
            first = table.column("image_uri")[pc.index(pc.is_finite(column), False).as_py()].as_py()
            raise ValueError(
                f"report column {name!r} has {bad} NaN or infinite value(s) (first at image {first!r}); "
                "NaN must never reach a report"
            )


def _check_ok_rows(ok: pa.Table) -> None:
    """Check that ok rows carry complete, consistent scores."""
    if ok.num_rows == 0:
        return
    for name in SCORE_COLUMNS:
        nulls = ok.column(name).null_count
        if nulls:
            raise ValueError(f"{nulls} ok row(s) have no {name!r}; an ok row needs every score column")
    if pc.any(pc.less_equal(ok.column("threshold"), 0.0)).as_py():
        raise ValueError("threshold must be > 0 in ok rows")
    expected = pc.divide(ok.column("score"), ok.column("threshold"))
    gap = pc.abs(pc.subtract(ok.column("normalized_score"), expected))
    tolerance = pc.multiply(pc.max_element_wise(pc.abs(expected), 1.0), _NORMALIZED_RTOL)
    if pc.any(pc.greater(gap, tolerance)).as_py():
        raise ValueError("normalized_score must equal score / threshold (the model's calibrated threshold)")
    fraction = ok.column("defect_area_fraction")
    if pc.any(pc.or_(pc.less(fraction, 0.0), pc.greater(fraction, 1.0))).as_py():
        raise ValueError("defect_area_fraction must be within [0, 1]")
    _check_positive(ok, "width")
    _check_positive(ok, "height")
    _check_inside(ok, "max_x", "width")
    _check_inside(ok, "max_y", "height")


def _check_positive(table: pa.Table, name: str) -> None:
    """Reject non-positive image sizes."""
    if pc.any(pc.less_equal(table.column(name), 0)).as_py():
        raise ValueError(f"{name} must be > 0")


def _check_inside(table: pa.Table, coordinate: str, size: str) -> None:
    """Reject a maximum location outside the original image."""
    values, limits = table.column(coordinate), table.column(size)
    outside = pc.or_(pc.less(values, 0), pc.greater_equal(values, limits))
    if pc.any(outside).as_py():
        raise ValueError(f"{coordinate} must be within [0, {size}) in original image pixels")


def _check_error_rows(errors: pa.Table) -> None:
    """Check that error rows carry a reason and no scores."""
    if errors.num_rows == 0:
        return
    reasons = errors.column("error")
    empty = reasons.null_count + (pc.sum(pc.equal(pc.utf8_trim_whitespace(reasons), "")).as_py() or 0)
    if empty:
        raise ValueError(f"{empty} error row(s) have no error message")
    for name in NULL_ON_ERROR_COLUMNS:
        filled = errors.num_rows - errors.column(name).null_count
        if filled:
            raise ValueError(f"{filled} error row(s) have a {name!r}; score columns must be null for error rows")
