"""Query the score reports with DuckDB: filtered rows, top-N, daily summaries, already-scored images.

Every read path goes through the same four steps:

1. **Prune**: list only the files of the requested product and date range
   (:func:`padim.reports.layout.list_report_files`); no other file is opened.
2. **Screen**: read each listed file's footer (:mod:`padim.reports.screening`): files whose
   schema is not a report schema are skipped with a warning; corrupt files stop the queries
   (:func:`query_reports`, :func:`daily_summary`, which never change the store) with a one-line
   :class:`~padim.reports.errors.CorruptReportError`, and are quarantined by the reads a score
   run depends on (:func:`scored_contents`, :func:`scored_images`, :func:`read_partition`), so a
   damaged file never blocks a night.
3. **Deduplicate**: rows sharing (product, date, image_uri, model_version) are one observation;
   keep the ``ok`` row if any, else the newest ``scored_at`` (then the greatest ``run_id``). A
   re-run night, or two concurrent runs that scored the same image, therefore show one row.
   The writer keeps keys unique within a file, so only partitions holding several files (re-runs,
   concurrent runs) pay for this step.
4. **Filter / aggregate** on the deduplicated rows (minimum score, anomalies only, top N, summary).

Local stores are read by DuckDB directly; other filesystems (S3) through the fsspec filesystem
registered on the connection, so credentials and endpoint come from the environment. A DuckDB
failure is a :class:`~padim.reports.errors.ReportQueryError` with the first line of DuckDB's
message.
"""

from __future__ import annotations

import numbers
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import Any, TypeVar

import duckdb
import pandas as pd
import pyarrow as pa

from padim.io import fsio
from padim.reports import schema as report_schema
from padim.reports.errors import ReportQueryError, one_line
from padim.reports.layout import ReportFile, list_report_files, resolve_store
from padim.reports.schema import (
    DEDUP_KEY,
    STATUS_ERROR,
    STATUS_OK,
    SUMMARY_SCHEMA,
    duckdb_type_of,
    parse_report_date,
    validate_product,
)
from padim.reports.screening import OnCorrupt, read_screened

__all__ = [
    "DEDUP_QUALIFY_SQL",
    "daily_summary",
    "deduplicate_table",
    "query_reports",
    "read_partition",
    "scored_contents",
    "scored_images",
]

_LOCAL_DATABASE: duckdb.DuckDBPyConnection | None = None
_LOCAL_DATABASE_LOCK = threading.Lock()
_HIVE_TYPES = "{'product': VARCHAR, 'date': DATE}"
DEDUP_QUALIFY_SQL = (
    f"QUALIFY row_number() OVER (PARTITION BY {', '.join(DEDUP_KEY)} "
    f"ORDER BY (status = '{STATUS_OK}') DESC, scored_at DESC, run_id DESC) = 1"
)
"""The deduplication rule: per key, the ok row first, then the newest ``scored_at``, then ``run_id``."""
T = TypeVar("T")
_ROW_ORDER = "date, product, image_uri, model_version"
_TOP_ORDER = "score DESC, date, product, image_uri, model_version"


def query_reports(
    store_url: str,
    *,
    product: str | None = None,
    since: date | datetime | str | None = None,
    until: date | datetime | str | None = None,
    min_score: float | None = None,
    anomalies_only: bool = False,
    model_version: str | None = None,
    top: int | None = None,
) -> pd.DataFrame:
    """Return report rows, deduplicated, filtered and sorted.

    Args:
        store_url: Store root (local path or ``s3://bucket/prefix``).
        product: Only this product.
        since: First date, inclusive (``date`` or ``YYYY-MM-DD``).
        until: Last date, inclusive.
        min_score: Only rows whose raw ``score`` is >= this value.
        anomalies_only: Only rows with ``is_anomaly`` true.
        model_version: Only rows scored by this model version.
        top: Return the ``top`` highest-scoring rows (rows without a score are left out), sorted
            by score descending; ``anomalies_only=True, top=N`` gives the top N anomalies.

    Returns:
        A DataFrame with the report columns in schema order; sorted by score descending when
        ``top`` is given, else by date, product, image_uri. ``date`` holds ``datetime.date``
        values, ``scored_at`` is UTC, integer and boolean columns use pandas nullable dtypes.
        Empty (with the same columns) when nothing matches or the store has no reports.

    Raises:
        ValueError: On an invalid product name, date, ``since`` after ``until``, a non-finite
            ``min_score`` or a ``top`` that is not a positive integer.
        CorruptReportError: If a report file in scope is not readable Parquet (it is named;
            files whose schema is not a report schema are skipped with a warning instead).
        StoreError: If the store cannot be listed or a report file cannot be read.
    """
    scope = _Scope.build(product, since, until, model_version)
    post: list[str] = []
    params: list[Any] = []
    if min_score is not None:
        post.append("score >= ?")
        params.append(_finite(min_score, "min_score"))
    if anomalies_only:
        post.append("is_anomaly")
    order, limit = _ROW_ORDER, ""
    if top is not None:
        post.append("score IS NOT NULL")
        order, limit = _TOP_ORDER, f" LIMIT {_positive_int(top, 'top')}"
    schema = report_schema.REPORT_SCHEMA

    def run(files: list[ReportFile]) -> pa.Table:
        if not files:
            return schema.empty_table()
        with _Reader(store_url, files) as reader:
            kept, kept_params = reader.deduplicated_cte(scope)
            sql = f"{kept} SELECT {', '.join(schema.names)} FROM kept{_where(post)} ORDER BY {order}{limit}"
            return reader.fetch(sql, kept_params + params)

    return _to_pandas(scope.read(store_url, run, on_corrupt="raise"), schema)


def daily_summary(
    store_url: str,
    *,
    product: str | None = None,
    since: date | datetime | str | None = None,
    until: date | datetime | str | None = None,
    model_version: str | None = None,
) -> pd.DataFrame:
    """Summarise the reports per product and date.

    Columns: ``product``, ``date``, ``images`` (rows, ok and error), ``scored`` (ok rows),
    ``errors``, ``anomalies``, ``anomaly_rate`` (anomalies / scored; NaN when nothing was
    scored), ``score_p50``, ``score_p90``, ``score_p99`` (linear interpolation, like
    ``numpy.percentile``) and ``score_max`` of the raw scores.

    Args:
        store_url: Store root.
        product: Only this product.
        since: First date, inclusive.
        until: Last date, inclusive.
        model_version: Only rows scored by this model version.

    Returns:
        One row per (product, date), sorted by date then product; empty with the same columns
        when there are no reports.

    Raises:
        ValueError: On an invalid product name or date range.
        CorruptReportError: If a report file in scope is not readable Parquet (foreign files are
            skipped with a warning).
        StoreError: If the store cannot be listed or a report file cannot be read.
    """
    scope = _Scope.build(product, since, until, model_version)
    return _to_pandas(
        scope.read(store_url, lambda files: _summarise(store_url, scope, files), on_corrupt="raise"), SUMMARY_SCHEMA
    )


def _summarise(store_url: str, scope: _Scope, files: list[ReportFile]) -> pa.Table:
    """Run the daily summary query over screened files."""
    if not files:
        return SUMMARY_SCHEMA.empty_table()
    with _Reader(store_url, files) as reader:
        kept, kept_params = reader.deduplicated_cte(scope)
        sql = f"""{kept},
            daily AS (
                SELECT product, date,
                    count(*) AS images,
                    count(*) FILTER (WHERE status = '{STATUS_OK}') AS scored,
                    count(*) FILTER (WHERE status = '{STATUS_ERROR}') AS errors,
                    count(*) FILTER (WHERE is_anomaly) AS anomalies,
                    quantile_cont(score, [0.5, 0.9, 0.99]) AS q,
                    max(score) AS score_max
                FROM kept GROUP BY product, date
            )
            SELECT product, date, images, scored, errors, anomalies,
                anomalies::DOUBLE / NULLIF(scored, 0) AS anomaly_rate,
                q[1] AS score_p50, q[2] AS score_p90, q[3] AS score_p99, score_max
            FROM daily ORDER BY date, product"""
        return reader.fetch(sql, kept_params)


def scored_images(
    store_url: str,
    product: str,
    model_version: str,
    date: date | datetime | str | None = None,
) -> set[str]:
    """Return the images already scored successfully by a model version, so a run can skip them.

    Args:
        store_url: Store root.
        product: Product name.
        model_version: Model version that must have scored the image.
        date: Only this date; None means any date.

    Returns:
        The ``image_uri`` of every ``ok`` row of that product and model version. Foreign files
        are skipped; corrupt files are quarantined (see :mod:`padim.reports.screening`).

    Raises:
        ValueError: On an invalid product name or date.
        StoreError: If the store cannot be listed or a report file cannot be read.
    """
    scope = _Scope.build(product, date, date, model_version)

    def run(files: list[ReportFile]) -> set[str]:
        if not files:
            return set()
        with _Reader(store_url, files) as reader:
            conditions = [*scope.conditions, f"status = '{STATUS_OK}'"]
            sql = f"SELECT DISTINCT image_uri FROM {reader.source}{_where(conditions)}"
            return set(reader.fetch(sql, scope.params).column("image_uri").to_pylist())

    return scope.read(store_url, run, on_corrupt="quarantine")


def scored_contents(store_url: str, product: str, model_version: str, date: date | datetime | str) -> dict[str, str]:
    """The images a model version has already scored on one night, with the content it scored.

    Reads only that night's partition. A score run skips an image whose URI *and* content hash
    are here (re-running a night adds no rows) and scores it again when the file changed under
    the same name (the newer row then wins on read).

    Args:
        store_url: Store root.
        product: Product name.
        model_version: Model version that must have scored the image.
        date: The production night.

    Returns:
        ``{image_uri: image_sha256}`` of every ``ok`` row kept by deduplication. Foreign files
        are skipped; corrupt files are quarantined, so a damaged file never blocks the night
        (see :mod:`padim.reports.screening`).

    Raises:
        ValueError: On an invalid product name or date.
        StoreError: If the store cannot be listed or a report file cannot be read or
            quarantined (storage faults are never taken for corruption).
    """
    scope = _Scope.build(product, date, date, model_version)

    def run(files: list[ReportFile]) -> dict[str, str]:
        if not files:
            return {}
        with _Reader(store_url, files) as reader:
            kept, kept_params = reader.deduplicated_cte(scope)
            sql = f"{kept} SELECT image_uri, image_sha256 FROM kept WHERE status = '{STATUS_OK}'"
            table = reader.fetch(sql, kept_params)
        return dict(zip(table.column("image_uri").to_pylist(), table.column("image_sha256").to_pylist(), strict=True))

    return scope.read(store_url, run, on_corrupt="quarantine")


def read_partition(store_url: str, product: str, day: date | str) -> tuple[pa.Table, list[str]]:
    """Read one product/date partition deduplicated (used by compaction).

    Args:
        store_url: Store root.
        product: Product name.
        day: Partition date.

    Returns:
        ``(table, urls)``: the deduplicated rows with the report schema, and the URLs of the
        files they were read from. Foreign files are left out (and so never deleted by
        compaction); corrupt files are quarantined.

    Raises:
        ValueError: If the files hold columns this code does not know (written by a newer
            schema), since rewriting them would drop data.
        StoreError: If a file cannot be read or quarantined.
    """
    scope = _Scope.build(product, day, day, None)
    schema = report_schema.REPORT_SCHEMA

    def run(files: list[ReportFile]) -> tuple[pa.Table, list[str]]:
        if not files:
            return schema.empty_table(), []
        with _Reader(store_url, files) as reader:
            unknown = sorted(set(reader.file_columns()) - set(schema.names))
            if unknown:
                raise ValueError(
                    f"report files of {product}/{day} hold columns {unknown} unknown to this version; "
                    "upgrade before compacting"
                )
            kept, kept_params = reader.deduplicated_cte(scope)
            sql = f"{kept} SELECT {', '.join(schema.names)} FROM kept ORDER BY image_uri"
            table = reader.fetch(sql, kept_params)
        return table.cast(schema), [f.url for f in files]

    return scope.read(store_url, run, on_corrupt="quarantine")


class _Scope:
    """Partition-level filters: product, date range and model version (all in the dedup key)."""

    def __init__(self, product: str | None, since: date | None, until: date | None, model_version: str | None) -> None:
        self.product = product
        self.since = since
        self.until = until
        self.conditions: list[str] = []
        self.params: list[Any] = []
        for column, operator, value in (
            ("product", "=", product),
            ("date", ">=", since),
            ("date", "<=", until),
            ("model_version", "=", model_version),
        ):
            if value is not None:
                self.conditions.append(f"{column} {operator} ?")
                self.params.append(value)

    @classmethod
    def build(
        cls,
        product: str | None,
        since: date | datetime | str | None,
        until: date | datetime | str | None,
        model_version: str | None,
    ) -> _Scope:
        """Validate user arguments and build the scope."""
        if product is not None:
            validate_product(product)
        first = None if since is None else parse_report_date(since, name="since")
        last = None if until is None else parse_report_date(until, name="until")
        if first is not None and last is not None and first > last:
            raise ValueError(f"since ({first}) is after until ({last})")
        if model_version is not None and not isinstance(model_version, str):
            raise ValueError(f"model_version must be a string, got {type(model_version).__name__}")
        return cls(product, first, last, model_version)

    def files(self, store_url: str) -> list[ReportFile]:
        """List the files this scope can touch (partition pruning)."""
        return list_report_files(store_url, product=self.product, since=self.since, until=self.until)

    def read(self, store_url: str, run: Callable[[list[ReportFile]], T], *, on_corrupt: OnCorrupt) -> T:
        """List, screen and query this scope's files (``run`` gets the screened list, maybe empty)."""
        files = self.files(store_url)
        if not files:
            return run([])
        return read_screened(store_url, files, run, on_corrupt=on_corrupt)


class _Reader:
    """A DuckDB connection over a fixed list of report files.

    Files are read through a ``UNION ALL BY NAME`` with an empty, fully typed row of the current
    schema, so columns that no file has yet (files written before a column was added) read as
    typed NULLs without a separate pass over the file footers.
    """

    def __init__(self, store_url: str, files: Sequence[ReportFile]) -> None:
        if fsio.is_local(store_url):
            self.connection = _local_cursor()
        else:
            fs, _ = resolve_store(store_url)
            self.connection = duckdb.connect()
            self.connection.register_filesystem(fs)
        self.connection.execute("SET TimeZone = 'UTC'")
        self.files = list(files)
        self.source = self.source_of(self.files)

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.connection.close()

    @staticmethod
    def source_of(files: Sequence[ReportFile]) -> str:
        """Return a FROM-clause subquery reading ``files`` with every current report column."""
        urls = ", ".join(_quote(f.url) for f in files)
        typed_nulls = ", ".join(
            f"CAST(NULL AS {duckdb_type_of(field.type)}) AS {field.name}" for field in report_schema.REPORT_SCHEMA
        )
        scan = f"read_parquet([{urls}], hive_partitioning = true, union_by_name = true, hive_types = {_HIVE_TYPES})"
        return f"((SELECT {typed_nulls} WHERE false) UNION ALL BY NAME (SELECT * FROM {scan}))"

    def file_columns(self) -> list[str]:
        """Return the union of the column names stored in the files (plus partition keys)."""
        urls = ", ".join(_quote(f.url) for f in self.files)
        scan = f"read_parquet([{urls}], hive_partitioning = true, union_by_name = true, hive_types = {_HIVE_TYPES})"
        return [row[0] for row in self.connection.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()]

    def deduplicated_cte(self, scope: _Scope) -> tuple[str, list[Any]]:
        """Return ``WITH kept AS (...)`` (pruned rows, one per dedup key) and its parameters.

        Deduplication only runs over partitions that hold several files: the writer never puts
        two rows with the same key in one file, so a single-file partition has no duplicates.
        """
        columns = ", ".join(report_schema.REPORT_SCHEMA.names)
        single, multiple = _split_by_partition_size(self.files)
        parts: list[str] = []
        params: list[Any] = []
        if single:
            parts.append(f"SELECT {columns} FROM {self.source_of(single)}{_where(scope.conditions)}")
            params += scope.params
        if multiple:
            parts.append(
                f"SELECT {columns} FROM {self.source_of(multiple)}{_where(scope.conditions)} {DEDUP_QUALIFY_SQL}"
            )
            params += scope.params
        return f"WITH kept AS ({' UNION ALL '.join(f'({part})' for part in parts)})", params

    def fetch(self, sql: str, params: Sequence[Any]) -> pa.Table:
        """Run a query and return its result as an Arrow table.

        Raises:
            ReportQueryError: If DuckDB fails (unreachable or damaged file, unexpected data);
                the message keeps only the first line of DuckDB's.
        """
        try:
            return self.connection.sql(sql, params=list(params)).to_arrow_table()
        except duckdb.Error as exc:
            folders = sorted({f.url.rsplit("/", 1)[0] for f in self.files})
            where = folders[0] if len(folders) == 1 else f"{len(folders)} partitions"
            reason = one_line(str(exc)) or type(exc).__name__
            raise ReportQueryError(f"cannot read the report files in {where}: {reason}") from exc


def deduplicate_table(table: pa.Table) -> pa.Table:
    """Keep one row per dedup key of an in-memory report table (same rule as the readers).

    Args:
        table: Rows with the report schema.

    Returns:
        ``table`` itself when it has no duplicate keys, else the deduplicated rows.
    """
    keys = table.group_by(list(DEDUP_KEY)).aggregate([])
    if keys.num_rows == table.num_rows:
        return table
    cursor = _local_cursor()
    try:
        cursor.register("report_rows", table)
        result = cursor.sql(f"SELECT * FROM report_rows {DEDUP_QUALIFY_SQL}").to_arrow_table()
    finally:
        cursor.close()
    return result.cast(table.schema)


def _split_by_partition_size(files: Sequence[ReportFile]) -> tuple[list[ReportFile], list[ReportFile]]:
    """Split files into those alone in their partition and those sharing it with others."""
    counts = Counter((f.product, f.date) for f in files)
    single = [f for f in files if counts[(f.product, f.date)] == 1]
    multiple = [f for f in files if counts[(f.product, f.date)] > 1]
    return single, multiple


def _local_cursor() -> duckdb.DuckDBPyConnection:
    """Return a new cursor on the process-wide in-memory database used for local stores.

    Opening a DuckDB database costs tens of milliseconds; a cursor is nearly free and has its own
    session, so concurrent callers in different threads do not share state.
    """
    global _LOCAL_DATABASE
    with _LOCAL_DATABASE_LOCK:
        if _LOCAL_DATABASE is None:
            _LOCAL_DATABASE = duckdb.connect()
        return _LOCAL_DATABASE.cursor()


def _to_pandas(table: pa.Table, schema: pa.Schema) -> pd.DataFrame:
    """Cast a result to ``schema`` and convert it with plain dates and nullable ints/bools."""
    table = table.select(schema.names).cast(schema)
    mapping = {pa.int32(): pd.Int32Dtype(), pa.bool_(): pd.BooleanDtype()}
    return table.to_pandas(types_mapper=mapping.get, date_as_object=True)


def _where(conditions: Sequence[str]) -> str:
    """Join SQL conditions into a WHERE clause (empty when there are none)."""
    return f" WHERE {' AND '.join(conditions)}" if conditions else ""


def _quote(text: str) -> str:
    """Quote a string literal for SQL."""
    return "'" + text.replace("'", "''") + "'"


def _finite(value: float, name: str) -> float:
    """Convert to a finite float or raise a ValueError."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if result != result or result in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return result


def _positive_int(value: int, name: str) -> int:
    """Check a positive integer (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
