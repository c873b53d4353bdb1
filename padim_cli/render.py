"""Plain-text output of the command line: aligned tables and run summaries.

Everything here is plain text (no colours, no wrapping), so it reads the same on a terminal, in a
log file and in a scheduler's output.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "format_table",
    "model_rows",
    "print_json",
    "score_lines",
    "top_rows",
    "train_lines",
]

MODEL_HEADERS = ("", "version", "created (UTC)", "backbone", "input", "d", "n_train", "image thr", "pixel thr", "size")
TOP_HEADERS = ("#", "image", "score", "norm.", "anomaly", "heat map")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Align rows under headers in columns separated by two spaces.

    Args:
        headers: Column titles.
        rows: Cells (converted with ``str``; ``None`` shows as ``-``).

    Returns:
        The table, one line per row, without a trailing newline.
    """
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def print_json(value: Any) -> None:
    """Print a value as indented JSON on standard output."""
    print(json.dumps(value, indent=2, default=str, allow_nan=False))


def _number(value: object, digits: int = 3) -> str:
    """A float with a fixed number of decimals, or ``-``."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _size(n_bytes: int) -> str:
    """Human-readable byte count."""
    size = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def model_rows(versions: Sequence[Any]) -> list[list[object]]:
    """Table rows of model versions (``padim.io.store.VersionInfo``), in the given order.

    Args:
        versions: Versions, newest first.

    Returns:
        Rows matching :data:`MODEL_HEADERS`.
    """
    rows = []
    for info in versions:
        summary: Mapping[str, Any] = info.summary
        thresholds = summary.get("thresholds") or {}
        crop = summary.get("crop_size")
        size = summary.get("image_size")
        geometry = f"{size}->{crop}" if crop else f"{size}"
        created = (info.created_at or "")[:19].replace("T", " ")
        rows.append(
            [
                "*" if info.is_latest else ("c" if getattr(info, "is_candidate", False) else ""),
                info.version,
                created or None,
                summary.get("backbone"),
                geometry,
                summary.get("channels"),
                summary.get("n_train"),
                _number(thresholds.get("image")),
                _number(thresholds.get("pixel")),
                _size(info.size_bytes),
            ]
        )
    return rows


def train_lines(result: Mapping[str, Any]) -> list[str]:
    """Summary of a train (or retrain) flow result.

    Args:
        result: The flow's return value.

    Returns:
        Lines to print.
    """
    lines = [f"Published model {result['product']} version {result['version']}"]
    lines.append(f"  training images     {result.get('n_train')}")
    if result.get("n_calibration") is not None:
        lines.append(f"  calibration images  {result['n_calibration']} (held-out normal images)")
    if result.get("n_failed"):
        lines.append(f"  unreadable images   {result['n_failed']} (skipped; not in the model)")
        for failure in (result.get("failed") or [])[:FAILED_SHOWN]:
            lines.append(f"    {failure['uri']}: {failure['reason']}")
        if result["n_failed"] > FAILED_SHOWN:
            lines.append(f"    ... and {result['n_failed'] - FAILED_SHOWN} more (--json lists the first 20)")
    lines.append(f"  image threshold     {_number(result.get('image_threshold'))}")
    if result.get("pixel_threshold") is not None:
        lines.append(f"  pixel threshold     {_number(result.get('pixel_threshold'))}")
    if result.get("url"):
        lines.append(f"  stored at           {result['url']}")
    return lines


FAILED_SHOWN = 5
"""Skipped training images a train summary names (with their reasons)."""


def top_rows(top: Sequence[Mapping[str, Any]], limit: int = 10) -> list[list[object]]:
    """Table rows of the highest-scoring images of a score run.

    Args:
        top: Rows with ``image_uri``, ``score``, ``normalized_score``, ``is_anomaly``, ``heatmap_uri``.
        limit: Most rows.

    Returns:
        Rows matching :data:`TOP_HEADERS`.
    """
    return [
        [
            rank,
            row.get("image_uri"),
            _number(row.get("score"), 2),
            _number(row.get("normalized_score"), 2),
            "yes" if row.get("is_anomaly") else "no",
            row.get("heatmap_uri"),
        ]
        for rank, row in enumerate(top[:limit], start=1)
    ]


def score_lines(summary: Mapping[str, Any], report_url: str) -> list[str]:
    """Summary of a score flow result.

    Args:
        summary: The flow's return value.
        report_url: Where the report partition lives.

    Returns:
        Lines to print.
    """
    lines = [
        f"Scored {summary['product']} {summary['date']} with model {summary['model_version']}",
        f"  images              {summary['n_images']}",
        f"  scored              {summary['n_scored']}",
        f"  skipped             {summary['n_skipped']} (already scored tonight by this model version, same content)",
        f"  anomalies           {summary['n_anomalies']}",
        f"  errors              {summary['n_errors']} (unreadable images; each has a report row with the reason)",
        f"  report              {report_url}",
    ]
    drift = summary.get("drift") or {}
    if drift.get("detected"):
        lines.append(f"  drift detected      {'; '.join(drift.get('reasons') or [])}")
    top = [row for row in summary.get("top") or [] if row.get("is_anomaly")]
    if top:
        lines += ["", "Top anomalies:", format_table(TOP_HEADERS, top_rows(top))]
    return lines
