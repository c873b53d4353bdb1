"""Errors of the report readers, each with a one-line message the command line prints as is.

Both are :class:`~padim.errors.StoreError`, so callers that already catch store errors (and the
task retry policy, which retries them) keep working.
"""

from __future__ import annotations

import re

from padim.errors import StoreError

__all__ = ["MAX_REASON_CHARS", "CorruptReportError", "ReportQueryError", "one_line"]

MAX_REASON_CHARS = 240
"""Longest reason kept from a library message (DuckDB binder errors run to thousands of characters)."""


class ReportQueryError(StoreError):
    """A DuckDB query over the report files failed; the message is the first line of DuckDB's."""


class CorruptReportError(StoreError):
    """Report files are not readable Parquet (not Parquet at all, truncated, damaged footer).

    Attributes:
        url: The (first) corrupt file.
        reason: Why it is not readable, one line.
    """

    def __init__(self, url: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"{url}: {reason}")
        self.url = url
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        """Rebuild from ``(url, reason, message)`` (Prefect and Dask send exceptions between processes)."""
        return (type(self), (self.url, self.reason, str(self)))


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """Keep the first non-empty line of a message, whitespace collapsed, cut to ``limit`` characters.

    Args:
        text: A library's message, possibly many lines long.
        limit: Maximum length of the result (an ellipsis marks a cut).

    Returns:
        One short line; the exception's type name is the caller's business.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    first = re.sub(r"\s+", " ", lines[0]).strip() if lines else ""
    return first if len(first) <= limit else first[: limit - 3].rstrip() + "..."
