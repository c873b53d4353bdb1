"""Write score report rows as Parquet files, one new file per run and partition, atomically.

A run never modifies or replaces another run's file: it adds its own file, named
``<run_id>-<uuid>.parquet``, in each ``product=<p>/date=<d>`` partition it touches. Each file is
complete before it becomes visible (local: written under a dot-prefixed temporary name, fsynced,
then renamed; object stores: one PUT of the finished object), so readers never see a partial file.
Within one file the dedup key (product, date, image_uri, model_version) is unique: a batch that
holds the same image twice is reduced with the readers' rule before it is written. Re-runs and
concurrent runs may still leave several rows for the same image in *different* files of a
partition; every read path deduplicates them (see :mod:`padim.reports.query`), and
:func:`compact_partition` can rewrite a partition with the duplicates removed.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from datetime import date, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from padim.errors import StoreError
from padim.io import fsio
from padim.reports import schema as report_schema
from padim.reports.layout import list_report_files, new_report_basename, partition_url
from padim.reports.query import deduplicate_table, read_partition
from padim.reports.rows import ReportRows, to_report_table
from padim.reports.schema import FILE_SCHEMA_METADATA_KEY, PARTITION_COLUMNS, file_schema, parse_report_date

__all__ = ["compact_partition", "compact_reports", "write_report_rows"]

logger = logging.getLogger(__name__)

COMPRESSION = "zstd"
COMPACTION_RUN_ID = "compacted"


def write_report_rows(store_url: str, rows: ReportRows, *, run_id: str) -> list[str]:
    """Validate report rows and write them, one new Parquet file per product/date partition.

    Args:
        store_url: Store root (local path or ``s3://bucket/prefix``); files go under
            ``<store>/reports/product=<p>/date=<YYYY-MM-DD>/``.
        rows: Dicts (e.g. from :func:`~padim.reports.make_ok_row`), a pandas DataFrame or an
            Arrow table with report columns; missing nullable columns are filled with nulls and a
            missing ``run_id`` column with ``run_id``. Rows repeating an image (same product,
            date, image_uri and model_version) are reduced to one with the readers' rule.
        run_id: The writing run; part of each file name and required to match the rows.

    Returns:
        The URLs of the files written (local: absolute paths), empty when ``rows`` is empty.

    Raises:
        ValueError: If ``run_id`` is empty or the rows do not satisfy the report schema (unknown
            columns, wrong types, NaN or infinite scores, missing required values, ...).
        StoreError: If a file cannot be written.
    """
    if not isinstance(run_id, str) or not run_id.strip():
        raise ValueError("run_id must be a non-empty string")
    table = deduplicate_table(to_report_table(rows, run_id=run_id))
    written = []
    for (product, day), part in _split_partitions(table):
        written.append(_write_file(store_url, product, day, part, run_id))
    return written


def compact_partition(store_url: str, product: str, date: date | datetime | str) -> str | None:
    """Rewrite one partition as a single deduplicated file, then delete the files it replaces.

    The new file is written atomically before any old file is deleted, and only the files that
    were read are deleted, so a run writing into the partition meanwhile loses nothing; a reader
    in between sees duplicates that the read path already hides.

    Args:
        store_url: Store root.
        product: Product name.
        date: Partition date.

    Returns:
        The URL of the partition's only file afterwards, or None when the partition is empty.

    Raises:
        ValueError: On an invalid product or date, or if the files were written by a newer schema.
        StoreError: If writing or deleting fails.
    """
    day = parse_report_date(date)
    table, old_urls = read_partition(store_url, product, day)
    if not old_urls:
        return None
    if len(old_urls) == 1 and table.num_rows == _count_rows(old_urls[0]):
        return old_urls[0]
    new_url = _write_file(store_url, product, day, table, COMPACTION_RUN_ID)
    for url in old_urls:
        fs, path = fsio.url_to_fs(url)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            logger.info("report file %s was already removed by another compaction", url)
        except OSError as exc:
            raise StoreError(f"compacted {product}/{day} into {new_url} but cannot delete {url}: {exc}") from exc
    return new_url


def compact_reports(
    store_url: str,
    *,
    product: str | None = None,
    since: date | datetime | str | None = None,
    until: date | datetime | str | None = None,
) -> list[str]:
    """Compact every partition in a scope that holds more than one file.

    Readers hide duplicates anyway, but deduplicating costs query time in proportion to the rows
    of multi-file partitions; the score flow can call this after a re-run, or an operator on a
    schedule. Single-file partitions are left untouched.

    Args:
        store_url: Store root.
        product: Only this product.
        since: First date, inclusive.
        until: Last date, inclusive.

    Returns:
        The URLs of the compacted files, one per partition that was rewritten.

    Raises:
        ValueError: On an invalid product or date, or files written by a newer schema.
        StoreError: If listing, writing or deleting fails.
    """
    first = None if since is None else parse_report_date(since, name="since")
    last = None if until is None else parse_report_date(until, name="until")
    files = list_report_files(store_url, product=product, since=first, until=last)
    counts = Counter((f.product, f.date) for f in files)
    compacted = []
    for (name, day), count in sorted(counts.items()):
        if count > 1:
            url = compact_partition(store_url, name, day)
            if url is not None:
                compacted.append(url)
    return compacted


def _split_partitions(table: pa.Table) -> list[tuple[tuple[str, date], pa.Table]]:
    """Group rows by (product, date), each group sorted by image_uri."""
    keys = table.group_by(list(PARTITION_COLUMNS)).aggregate([]).to_pylist()
    groups = []
    for key in sorted(keys, key=lambda k: (k["product"], k["date"])):
        mask = pc.and_(
            pc.equal(table.column("product"), key["product"]),
            pc.equal(table.column("date"), pa.scalar(key["date"], pa.date32())),
        )
        part = table.filter(mask).sort_by([("image_uri", "ascending")])
        groups.append(((key["product"], key["date"]), part))
    return groups


def _encode_parquet(part: pa.Table) -> bytes:
    """Encode one partition's rows (without the partition columns) as a zstd Parquet file."""
    schema = file_schema(report_schema.REPORT_SCHEMA)
    metadata = dict(schema.metadata or {})
    metadata[FILE_SCHEMA_METADATA_KEY] = str(report_schema.REPORT_SCHEMA_VERSION).encode()
    body = part.select(schema.names).cast(schema).replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(body, buffer, compression=COMPRESSION)
    return buffer.getvalue()


def _write_file(store_url: str, product: str, day: date, part: pa.Table, run_id: str) -> str:
    """Write one partition file atomically and return its URL."""
    url = fsio.join_url(partition_url(store_url, product, day), new_report_basename(run_id))
    data = _encode_parquet(part)
    try:
        fsio.write_bytes_atomic(url, data)
    except OSError as exc:
        raise StoreError(f"cannot write report file {url}: {exc}") from exc
    fs, path = fsio.url_to_fs(url)
    return fsio.to_url(fs, path)


def _count_rows(url: str) -> int:
    """Return the number of rows of one Parquet file from its footer."""
    fs, path = fsio.url_to_fs(url)
    with fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows
