"""Where report files live: ``<store>/reports/product=<p>/date=<YYYY-MM-DD>/<file>.parquet``.

Listing is done here, with fsspec, for local and object stores alike, so that partition pruning
(by product and date range) happens before any file is opened and so that only complete report
files are ever read: names starting with ``.`` or ``_`` (temporary files of a write in progress)
and names not ending in ``.parquet`` are ignored.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import date

from fsspec import AbstractFileSystem

from padim.errors import StoreError
from padim.io import fsio
from padim.reports.schema import REPORTS_DIRNAME, validate_product

__all__ = [
    "ReportFile",
    "list_report_files",
    "new_report_basename",
    "partition_url",
    "reports_url",
    "resolve_store",
]

PARQUET_SUFFIX = ".parquet"
_RUN_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ReportFile:
    """One complete report file found in the store.

    Attributes:
        url: Full URL (``s3://bucket/key``) or absolute local path, as DuckDB reads it.
        product: Value of the ``product=`` partition folder.
        date: Value of the ``date=`` partition folder.
    """

    url: str
    product: str
    date: date


def resolve_store(store_url: str) -> tuple[AbstractFileSystem, str]:
    """Resolve a store URL to its filesystem and the path of its ``reports`` folder.

    Args:
        store_url: Store root, a local path or e.g. ``s3://bucket/prefix``.

    Returns:
        ``(fs, reports_path)`` with ``reports_path`` as the filesystem expects it.

    Raises:
        ValueError: If ``store_url`` is empty.
    """
    if not isinstance(store_url, str) or not store_url.strip():
        raise ValueError("store_url must be a non-empty path or URL")
    fs, root = fsio.url_to_fs(store_url.rstrip("/") or "/")
    return fs, f"{root.rstrip('/')}/{REPORTS_DIRNAME}"


def reports_url(store_url: str) -> str:
    """Return the URL of the ``reports`` folder of a store.

    Args:
        store_url: Store root.

    Returns:
        ``<store>/reports`` with the store's protocol kept.
    """
    return fsio.join_url(store_url, REPORTS_DIRNAME)


def partition_url(store_url: str, product: str, day: date) -> str:
    """Return the URL of one product/date partition folder.

    Args:
        store_url: Store root.
        product: Product name (validated).
        day: Partition date.

    Returns:
        ``<store>/reports/product=<product>/date=<YYYY-MM-DD>``.
    """
    validate_product(product)
    return fsio.join_url(store_url, REPORTS_DIRNAME, f"product={product}", f"date={day.isoformat()}")


def new_report_basename(run_id: str) -> str:
    """Return a file name unique to one write of one run.

    Args:
        run_id: Run identifier; characters other than letters, digits, ``_`` and ``-`` are
            replaced so the name stays portable.

    Returns:
        ``<run_id>-<uuid4 hex>.parquet``.
    """
    safe = _RUN_ID_UNSAFE.sub("_", run_id).strip("_")[:64] or "run"
    return f"{safe}-{uuid.uuid4().hex}{PARQUET_SUFFIX}"


def list_report_files(
    store_url: str,
    *,
    product: str | None = None,
    since: date | None = None,
    until: date | None = None,
) -> list[ReportFile]:
    """List the complete report files of a store, pruned by product and date range.

    Args:
        store_url: Store root.
        product: Only list this product's partition folder.
        since: Only dates on or after this one.
        until: Only dates on or before this one.

    Returns:
        Files sorted by (product, date, url); empty when the store has no reports.

    Raises:
        StoreError: If the store cannot be listed (permissions, network).
    """
    fs, base = resolve_store(store_url)
    if product is not None:
        base = f"{base}/product={validate_product(product)}"
    fs.invalidate_cache(base)
    try:
        paths = fs.find(base)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StoreError(f"cannot list the reports under {fsio.to_url(fs, base)}: {exc}") from exc
    files = []
    for path in paths:
        found = _parse_report_path(fs, path, base, product)
        if found is None:
            continue
        if (since is not None and found.date < since) or (until is not None and found.date > until):
            continue
        files.append(found)
    return sorted(files, key=lambda f: (f.product, f.date, f.url))


def _parse_report_path(fs: AbstractFileSystem, path: str, base: str, product: str | None) -> ReportFile | None:
    """Parse ``[product=<p>/]date=<d>/<name>.parquet`` below ``base``; None if it is not one."""
    relative = path[len(base) :].strip("/") if path.startswith(base) else ""
    parts = relative.split("/")
    if product is not None:
        parts = [f"product={product}", *parts]
    if len(parts) != 3:
        return None
    product_part, date_part, name = parts
    if name.startswith((".", "_")) or not name.endswith(PARQUET_SUFFIX):
        return None
    if not product_part.startswith("product=") or not date_part.startswith("date="):
        return None
    try:
        day = date.fromisoformat(date_part.removeprefix("date="))
    except ValueError:
        return None
    return ReportFile(url=fsio.to_url(fs, path), product=product_part.removeprefix("product="), date=day)
