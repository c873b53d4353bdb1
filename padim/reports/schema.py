"""The versioned schema of the Parquet score reports and the layout of the report dataset.

One row per scored image (or per image that could not be scored). The dataset lives under
``<store>/reports/product=<product>/date=<YYYY-MM-DD>/<run file>.parquet``: ``product`` and ``date``
are hive partition keys, so they are encoded in the folder names and not stored inside the files.

Schema evolution rule: columns are only ever *added*, always nullable, at the end. Files written
with an older schema then read as null in the new columns (see :func:`check_additive_evolution`).
Readers accept exactly those evolutions (:func:`describe_schema_mismatch`): a file may lack
optional columns (older writer) or hold extra ones (newer writer), but every column it shares
with :data:`REPORT_SCHEMA` must have that column's type and every :data:`REQUIRED_COLUMNS` stored
in files must be there. Any other file is foreign and is skipped.
"""

from __future__ import annotations

from datetime import date, datetime

import pyarrow as pa

from padim.io.store_layout import validate_product as store_validate_product

__all__ = [
    "DEDUP_KEY",
    "DUCKDB_TYPES",
    "FILE_SCHEMA_METADATA_KEY",
    "FINITE_COLUMNS",
    "PARTITION_COLUMNS",
    "REPORTS_DIRNAME",
    "REPORT_COLUMNS",
    "REPORT_SCHEMA",
    "REPORT_SCHEMA_VERSION",
    "REQUIRED_COLUMNS",
    "SCORE_COLUMNS",
    "STATUS_ERROR",
    "STATUS_OK",
    "SUMMARY_SCHEMA",
    "check_additive_evolution",
    "describe_schema_mismatch",
    "duckdb_type_of",
    "file_schema",
    "parse_report_date",
    "validate_product",
]

REPORT_SCHEMA_VERSION = 1
"""Version of :data:`REPORT_SCHEMA`; bump it whenever a nullable column is appended."""

UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")

REPORT_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("product", pa.string()),
        pa.field("date", pa.date32()),
        pa.field("run_id", pa.string()),
        pa.field("scored_at", UTC_TIMESTAMP),
        pa.field("image_uri", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model_version", pa.string()),
        pa.field("backbone", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("normalized_score", pa.float64()),
        pa.field("is_anomaly", pa.bool_()),
        pa.field("defect_area_fraction", pa.float64()),
        pa.field("max_x", pa.int32()),
        pa.field("max_y", pa.int32()),
        pa.field("heatmap_uri", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ],
    metadata={"padim.report_schema_version": str(REPORT_SCHEMA_VERSION)},
)
"""Columns of a score report, in order.

Every field is nullable at the Arrow level; which columns must be filled is a row-level rule
(:data:`REQUIRED_COLUMNS` for every row, :data:`SCORE_COLUMNS` for ``status == "ok"`` rows only).
"""

REPORT_COLUMNS: tuple[str, ...] = tuple(REPORT_SCHEMA.names)

PARTITION_COLUMNS: tuple[str, ...] = ("product", "date")
"""Hive partition keys, in folder order. They are not stored inside the Parquet files."""

REQUIRED_COLUMNS: tuple[str, ...] = (
    "product",
    "date",
    "run_id",
    "scored_at",
    "image_uri",
    "model_version",
    "status",
)
"""Columns that are non-null in every row, including error rows."""

SCORE_COLUMNS: tuple[str, ...] = (
    "image_sha256",
    "width",
    "height",
    "backbone",
    "score",
    "threshold",
    "normalized_score",
    "is_anomaly",
    "defect_area_fraction",
    "max_x",
    "max_y",
)
"""Columns that are non-null in ``ok`` rows."""

NULL_ON_ERROR_COLUMNS: tuple[str, ...] = (
    "score",
    "threshold",
    "normalized_score",
    "is_anomaly",
    "defect_area_fraction",
    "max_x",
    "max_y",
)
"""Score-related columns that must be null in ``error`` rows."""

FINITE_COLUMNS: tuple[str, ...] = ("score", "threshold", "normalized_score", "defect_area_fraction")
"""Float columns where NaN and infinities are rejected: NaN must never reach a report."""

DEDUP_KEY: tuple[str, ...] = ("product", "date", "image_uri", "model_version")
"""Rows sharing this key are the same observation; readers keep exactly one of them.

The kept row is the ``ok`` one if any, then the newest ``scored_at``, then the greatest ``run_id``.
"""

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUSES: frozenset[str] = frozenset({STATUS_OK, STATUS_ERROR})

REPORTS_DIRNAME = "reports"
FILE_SCHEMA_METADATA_KEY = b"padim.report_schema_version"

SUMMARY_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("product", pa.string()),
        pa.field("date", pa.date32()),
        pa.field("images", pa.int64()),
        pa.field("scored", pa.int64()),
        pa.field("errors", pa.int64()),
        pa.field("anomalies", pa.int64()),
        pa.field("anomaly_rate", pa.float64()),
        pa.field("score_p50", pa.float64()),
        pa.field("score_p90", pa.float64()),
        pa.field("score_p99", pa.float64()),
        pa.field("score_max", pa.float64()),
    ]
)
"""Columns of :func:`padim.reports.daily_summary` (one row per product and date)."""

DUCKDB_TYPES: dict[pa.DataType, str] = {
    pa.string(): "VARCHAR",
    pa.date32(): "DATE",
    UTC_TIMESTAMP: "TIMESTAMPTZ",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
}


def file_schema(schema: pa.Schema | None = None) -> pa.Schema:
    """Return the schema stored inside one report file: the report schema minus partition keys.

    Args:
        schema: Report schema to strip (default :data:`REPORT_SCHEMA`).

    Returns:
        The schema without ``product`` and ``date``, metadata kept.
    """
    schema = REPORT_SCHEMA if schema is None else schema
    for name in PARTITION_COLUMNS:
        schema = schema.remove(schema.get_field_index(name))
    return schema


def duckdb_type_of(arrow_type: pa.DataType) -> str:
    """Map a report column's Arrow type to the DuckDB type name used in casts.

    Args:
        arrow_type: An Arrow type used by :data:`REPORT_SCHEMA`.

    Returns:
        The DuckDB SQL type name.

    Raises:
        ValueError: If the type has no mapping (a schema change needs one added here).
    """
    try:
        return DUCKDB_TYPES[arrow_type]
    except KeyError:
        raise ValueError(f"report column type {arrow_type} has no DuckDB mapping") from None


def validate_product(product: str) -> str:
    """Check that a product name is safe to use as a hive partition folder.

    The rule is the model store's (:func:`padim.io.store_layout.validate_product`), so every product that
    can have a model can have reports.

    Args:
        product: Product name, e.g. ``"bottle"``.

    Returns:
        The product name unchanged.

    Raises:
        InvalidProductNameError: If the name is not a safe identifier.
    """
    return store_validate_product(product)


def parse_report_date(value: date | datetime | str, *, name: str = "date") -> date:
    """Turn a date-like value into a :class:`datetime.date`.

    Args:
        value: A ``date``, a ``datetime`` (its calendar date is used) or an ISO ``YYYY-MM-DD``
            string.
        name: Argument name used in the error message.

    Returns:
        The calendar date.

    Raises:
        ValueError: If the value is not a date or not an ISO date string.
    """
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a date in YYYY-MM-DD form, got {value!r}") from None
    raise ValueError(f"{name} must be a date or a YYYY-MM-DD string, got {type(value).__name__}")


def check_additive_evolution(old: pa.Schema, new: pa.Schema) -> None:
    """Check that ``new`` only appends nullable columns to ``old``.

    Args:
        old: A previously released report schema.
        new: The schema that replaces it.

    Raises:
        ValueError: If a column was removed, renamed, reordered, retyped, or added as non-nullable.
    """
    if len(new) < len(old):
        raise ValueError(f"report schema lost columns: {sorted(set(old.names) - set(new.names))}")
    for index, old_field in enumerate(old):
        new_field = new.field(index)
        if new_field.name != old_field.name or new_field.type != old_field.type:
            raise ValueError(
                f"report column {index} changed from {old_field.name}:{old_field.type} to "
                f"{new_field.name}:{new_field.type}; only appending nullable columns is allowed"
            )
    for new_field in list(new)[len(old) :]:
        if not new_field.nullable:
            raise ValueError(f"new report column {new_field.name!r} must be nullable")


_STRING_TYPES: frozenset[pa.DataType] = frozenset({pa.string(), pa.large_string(), pa.string_view()})


def describe_schema_mismatch(stored: pa.Schema) -> str | None:
    """Tell why a file's schema is not a report schema, or None when readers can use the file.

    Compatible (None): any subset of the current :data:`REPORT_SCHEMA` columns that holds the
    required columns stored in files (:data:`REQUIRED_COLUMNS` minus the partition keys), with
    the current types, plus any extra columns (a newer writer appended them; readers ignore them
    and compaction refuses them). Equivalent encodings are accepted: large or view strings for
    strings, and UTC timestamps of any unit for ``scored_at``.

    Args:
        stored: The Arrow schema read from a file's footer.

    Returns:
        A short reason naming the first offending columns (``"column 'score' is string, expected
        double"``, ``"lacks the required columns ['image_uri', 'status']"``), or None.
    """
    expected = REPORT_SCHEMA
    for field in stored:
        index = expected.get_field_index(field.name)
        if index >= 0 and not _is_compatible_type(field.type, expected.field(index).type):
            return f"column {field.name!r} is {field.type}, expected {expected.field(index).type}"
    stored_names = set(stored.names)
    missing = [name for name in REQUIRED_COLUMNS if name not in PARTITION_COLUMNS and name not in stored_names]
    if missing:
        return f"lacks the required columns {missing}"
    return None


def _is_compatible_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a stored column type reads as the expected report type without changing its meaning."""
    if actual == expected:
        return True
    if expected in _STRING_TYPES:
        return actual in _STRING_TYPES
    if pa.types.is_timestamp(expected) and pa.types.is_timestamp(actual):
        return _is_utc(actual.tz) and _is_utc(expected.tz)
    return False


def _is_utc(tz: str | None) -> bool:
    """Whether a timestamp time zone name means UTC."""
    return tz is not None and tz.upper() in {"UTC", "+00:00", "ETC/UTC", "Z"}
