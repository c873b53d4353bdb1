"""Read report files defensively: check each listed file's footer before DuckDB opens it.

Every read path lists the files of its scope, then screens them here:

* **Foreign files** (a readable Parquet file whose schema is not a report schema: a column of
  the wrong type such as a text ``score``, required columns missing, only unrelated columns) are
  skipped with a warning naming them. They are never sorted, counted or deleted.
* **Corrupt files** (not Parquet, truncated, damaged footer) either stop the read with a
  one-line :class:`~padim.reports.errors.CorruptReportError` (``on_corrupt="raise"``: the query
  paths, which never change the store) or are **quarantined** and the read goes on
  (``on_corrupt="quarantine"``: the paths a score run depends on, so that one damaged file never
  blocks a night). A quarantined file is moved to
  ``<store>/reports/_quarantine/<product>/<date>/<name>.corrupt`` next to
  ``<name>.reason.txt``; neither name is listed by the readers, nor matched by
  ``reports/**/*.parquet`` globs, nor read by pyarrow datasets (``_`` folders are skipped).
* **Storage faults** (any error while fetching the bytes: network, permissions, a vanished
  file) are never taken for corruption: the bytes are fetched first, through fsspec, and only
  then parsed from memory, so an exception of the fetch is a storage error (an ``OSError``
  becomes a :class:`~padim.errors.StoreError`; anything else propagates unchanged) and an
  exception of the parse is a format error.

Only the footer is read (the last 64 KiB, more when the footer is larger), so screening costs
one small ranged read per file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timezone
from typing import Literal, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from padim.errors import StoreError
from padim.io import fsio
from padim.reports.errors import CorruptReportError, ReportQueryError, one_line
from padim.reports.layout import ReportFile, list_report_files, reports_url
from padim.reports.schema import describe_schema_mismatch, parse_report_date

__all__ = [
    "QUARANTINE_DIRNAME",
    "QUARANTINE_SUFFIX",
    "REASON_SUFFIX",
    "OnCorrupt",
    "quarantine_corrupt_reports",
    "quarantine_damaged_files",
    "quarantine_file",
    "quarantine_url",
    "read_footer_schema",
    "read_screened",
    "screen_files",
]

logger = logging.getLogger(__name__)

OnCorrupt = Literal["raise", "quarantine"]

QUARANTINE_DIRNAME = "_quarantine"
"""Folder of ``<store>/reports`` that holds quarantined files (ignored by every reader)."""
QUARANTINE_SUFFIX = ".corrupt"
"""Appended to a quarantined file's name, so ``*.parquet`` globs never match it."""
REASON_SUFFIX = ".reason.txt"
"""Appended to a quarantined file's original name for the text file that says why."""

PARQUET_MAGIC = b"PAR1"
FOOTER_TAIL_BYTES = 64 * 1024
_TRAILER_BYTES = 8  # footer length (4 bytes, little endian) + magic
_MIN_PARQUET_BYTES = len(PARQUET_MAGIC) + _TRAILER_BYTES
_REMOTE_WORKERS = 16
_FORMAT_ERRORS = (pa.ArrowException, OSError, ValueError)
"""What pyarrow raises on bad bytes; only caught around parsing bytes already in memory."""

T = TypeVar("T")


def screen_files(store_url: str, files: Sequence[ReportFile], *, on_corrupt: OnCorrupt) -> list[ReportFile]:
    """Keep the files that are readable report files; skip foreign ones, handle corrupt ones.

    Args:
        store_url: Store root (quarantined files go under its ``reports/_quarantine``).
        files: Listed report files.
        on_corrupt: ``"raise"`` to stop at corrupt files, ``"quarantine"`` to move them aside
            and go on.

    Returns:
        The files to read, in the given order.

    Raises:
        CorruptReportError: With ``on_corrupt="raise"``, naming the corrupt files.
        StoreError: If a file cannot be fetched or moved (storage fault, not corruption).
    """
    outcomes = _map_files(_inspect_file, store_url, files)
    corrupt = [(f, o) for f, o in zip(files, outcomes, strict=True) if isinstance(o, CorruptReportError)]
    if corrupt and on_corrupt == "raise":
        raise _corrupt_files_error(corrupt)
    for file, error in corrupt:
        quarantine_file(store_url, file, error.reason)
    kept = []
    for file, outcome in zip(files, outcomes, strict=True):
        if isinstance(outcome, CorruptReportError):
            continue
        mismatch = describe_schema_mismatch(outcome)
        if mismatch is None:
            kept.append(file)
        else:
            logger.warning("skipped report file %s: not a padim report (%s)", file.url, mismatch)
    return kept


def read_screened(
    store_url: str,
    files: Sequence[ReportFile],
    run: Callable[[list[ReportFile]], T],
    *,
    on_corrupt: OnCorrupt,
) -> T:
    """Screen files, then run a query over the kept ones; find damage the footers did not show.

    A file with an intact footer can still hold damaged data pages. When the query fails and
    ``on_corrupt`` is ``"quarantine"``, each file is read in full; the ones that do not parse are
    quarantined and the query runs once more. When every file parses, the query's own error is
    raised (a storage fault or a bug, not corruption).

    Args:
        store_url: Store root.
        files: Listed report files.
        run: Runs the query over a list of files (called with at least one file).
        on_corrupt: See :func:`screen_files`.

    Returns:
        ``run``'s result; ``run([])`` when no file is left.

    Raises:
        CorruptReportError: With ``on_corrupt="raise"``, when a footer is corrupt.
        ReportQueryError: If the query fails for another reason.
        StoreError: On storage faults.
    """
    kept = screen_files(store_url, files, on_corrupt=on_corrupt)
    try:
        return run(kept)
    except ReportQueryError:
        if on_corrupt == "raise" or not kept:
            raise
        readable = quarantine_damaged_files(store_url, kept)
        if len(readable) == len(kept):
            raise
    return run(readable)


def quarantine_damaged_files(store_url: str, files: Sequence[ReportFile]) -> list[ReportFile]:
    """Read each file in full, quarantine those whose data do not decode, return the others.

    Args:
        store_url: Store root.
        files: Files whose footers are sound.

    Returns:
        The files that decode, in the given order.

    Raises:
        StoreError: If a file cannot be fetched or moved.
    """
    outcomes = _map_files(_inspect_whole_file, store_url, files)
    readable = []
    for file, damage in zip(files, outcomes, strict=True):
        if damage is None:
            readable.append(file)
        else:
            quarantine_file(store_url, file, damage.reason)
    return readable


def quarantine_corrupt_reports(
    store_url: str,
    *,
    product: str | None = None,
    since: date | datetime | str | None = None,
    until: date | datetime | str | None = None,
) -> list[str]:
    """Quarantine every corrupt report file of a scope (footers only), e.g. before queries.

    The queries refuse corrupt files instead of changing the store; an operator runs this once
    to set them aside. Foreign files are left where they are (readers skip them).

    Args:
        store_url: Store root.
        product: Only this product.
        since: First date, inclusive.
        until: Last date, inclusive.

    Returns:
        The URLs the corrupt files were moved to.

    Raises:
        ValueError: On an invalid product name or date.
        StoreError: If a file cannot be listed, read or moved.
    """
    first = None if since is None else parse_report_date(since, name="since")
    last = None if until is None else parse_report_date(until, name="until")
    files = list_report_files(store_url, product=product, since=first, until=last)
    outcomes = _map_files(_inspect_file, store_url, files)
    return [
        quarantine_file(store_url, file, outcome.reason)
        for file, outcome in zip(files, outcomes, strict=True)
        if isinstance(outcome, CorruptReportError)
    ]


def read_footer_schema(url: str) -> pa.Schema:
    """Read the Arrow schema of a Parquet file from its footer only.

    Args:
        url: File URL or local path.

    Returns:
        The schema stored in the file.

    Raises:
        CorruptReportError: If the bytes are not a Parquet file (bad magic, truncated, bad footer).
        StoreError: If the bytes cannot be fetched (``OSError`` from the filesystem).
    """
    tail, size = _fetch_footer_bytes(url)
    return _parse_footer_schema(url, tail, size)


def quarantine_url(store_url: str, file: ReportFile) -> str:
    """Return where a report file goes when it is quarantined.

    Args:
        store_url: Store root.
        file: The report file.

    Returns:
        ``<store>/reports/_quarantine/<product>/<YYYY-MM-DD>/<name>.corrupt``.
    """
    name = file.url.rstrip("/").rsplit("/", 1)[-1]
    folder = fsio.join_url(reports_url(store_url), QUARANTINE_DIRNAME, file.product, file.date.isoformat())
    return fsio.join_url(folder, name + QUARANTINE_SUFFIX)


def quarantine_file(store_url: str, file: ReportFile, reason: str) -> str:
    """Move a corrupt report file out of the dataset, with a text file saying why.

    The reason file is written first, then the data file is moved (a rename locally, copy and
    delete on S3). A file another process already moved is not an error.

    Args:
        store_url: Store root.
        file: The corrupt file.
        reason: Why it was quarantined (one line).

    Returns:
        The quarantined file's URL.

    Raises:
        StoreError: If the reason cannot be written or the file cannot be moved.
    """
    target = quarantine_url(store_url, file)
    original = target.removesuffix(QUARANTINE_SUFFIX)
    note = _reason_text(file, reason, target)
    fs, source = fsio.url_to_fs(file.url)
    _, destination = fsio.url_to_fs(target)
    try:
        fsio.write_bytes_atomic(original + REASON_SUFFIX, note.encode("utf-8"))
        fs.mv(source, destination)
    except FileNotFoundError:
        logger.info("corrupt report file %s was already moved by another process", file.url)
        return target
    except OSError as exc:
        raise StoreError(f"cannot quarantine the corrupt report file {file.url}: {one_line(str(exc))}") from exc
    logger.warning("quarantined corrupt report file %s to %s: %s", file.url, target, reason)
    return target


def _inspect_file(store_url: str, file: ReportFile) -> pa.Schema | CorruptReportError:
    """The file's footer schema, or the corruption found (storage errors raise)."""
    try:
        return read_footer_schema(file.url)
    except CorruptReportError as exc:
        return exc


def _inspect_whole_file(store_url: str, file: ReportFile) -> CorruptReportError | None:
    """Read a whole file and decode every column; return the corruption found, if any."""
    data = _fetch(file.url, lambda fs, path: fs.cat_file(path))
    try:
        pq.read_table(pa.BufferReader(data))
    except _FORMAT_ERRORS as exc:
        return CorruptReportError(file.url, f"damaged Parquet data ({one_line(str(exc))})")
    return None


def _map_files(function: Callable[[str, ReportFile], T], store_url: str, files: Sequence[ReportFile]) -> list[T]:
    """Apply ``function(store_url, file)`` to every file; in threads on remote stores."""
    if fsio.is_local(store_url) or len(files) < 2:
        return [function(store_url, f) for f in files]
    with ThreadPoolExecutor(max_workers=min(_REMOTE_WORKERS, len(files))) as pool:
        return list(pool.map(lambda f: function(store_url, f), files))


def _fetch(url: str, read: Callable[[AbstractFileSystem, str], T]) -> T:
    """Run ``read(fs, path)`` on a file; ``OSError`` becomes :class:`StoreError`."""
    fs, path = fsio.url_to_fs(url)
    try:
        return read(fs, path)
    except OSError as exc:
        raise StoreError(f"cannot read the report file {url}: {one_line(str(exc)) or type(exc).__name__}") from exc


def _fetch_footer_bytes(url: str) -> tuple[bytes, int]:
    """Return the file's tail (holding the whole footer when the trailer is sane) and its size."""

    def read(fs: AbstractFileSystem, path: str) -> tuple[bytes, int]:
        with fs.open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - FOOTER_TAIL_BYTES))
            tail = handle.read()
            needed = _footer_length(tail) + _TRAILER_BYTES
            if len(tail) < needed <= size - len(PARQUET_MAGIC):
                handle.seek(size - needed)
                tail = handle.read()
        return tail, size

    return _fetch(url, read)


def _footer_length(tail: bytes) -> int:
    """The footer length a Parquet trailer announces (0 when there is no trailer)."""
    if len(tail) < _TRAILER_BYTES or tail[-len(PARQUET_MAGIC) :] != PARQUET_MAGIC:
        return 0
    return int.from_bytes(tail[-_TRAILER_BYTES : -len(PARQUET_MAGIC)], "little")


def _parse_footer_schema(url: str, tail: bytes, size: int) -> pa.Schema:
    """Parse the schema from a file's tail already in memory; any failure means corruption."""
    if size < _MIN_PARQUET_BYTES:
        raise CorruptReportError(url, f"{size} bytes, too small to be Parquet")
    if tail[-len(PARQUET_MAGIC) :] != PARQUET_MAGIC:
        raise CorruptReportError(url, "no Parquet magic bytes at the end (not Parquet, or truncated)")
    footer = _footer_length(tail)
    if footer + _TRAILER_BYTES > min(len(tail), size - len(PARQUET_MAGIC)):
        raise CorruptReportError(url, f"footer of {footer} bytes does not fit in the file (truncated)")
    try:
        return pq.read_schema(pa.BufferReader(PARQUET_MAGIC + tail[-(footer + _TRAILER_BYTES) :]))
    except _FORMAT_ERRORS as exc:
        raise CorruptReportError(url, f"damaged Parquet footer ({one_line(str(exc))})") from None


def _corrupt_files_error(corrupt: Sequence[tuple[ReportFile, CorruptReportError]]) -> CorruptReportError:
    """One error naming the corrupt files a query met (the first three in full)."""
    folders = sorted({f.url.rsplit("/", 1)[0] for f, _ in corrupt})
    where = folders[0] if len(folders) == 1 else f"{len(folders)} partitions"
    shown = "; ".join(str(error) for _, error in corrupt[:3])
    more = f" and {len(corrupt) - 3} more" if len(corrupt) > 3 else ""
    message = (
        f"cannot read the report files in {where}: corrupt {shown}{more}; "
        f"set them aside with padim.reports.quarantine_corrupt_reports (see docs/reports.md)"
    )
    return CorruptReportError(corrupt[0][1].url, corrupt[0][1].reason, message)


def _reason_text(file: ReportFile, reason: str, target: str) -> str:
    """The content of a quarantined file's ``.reason.txt``."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return (
        f"file: {file.url}\n"
        f"quarantined: {now}\n"
        f"reason: {reason}\n"
        f"moved to: {target}\n"
        f"restore: move it back to {file.url} (after repairing it) and delete this note\n"
    )
