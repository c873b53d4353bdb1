"""Progress bars for long loops (listing, feature extraction, scoring), quiet off a terminal.

A bar shows images done, images/s and the time left. It draws only when standard error is a
terminal and ``PADIM_PROGRESS`` is not ``0``; otherwise every call is a no-op, so scheduled runs
and CI logs stay clean.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Progress(Protocol):
    """Something that can be told how many more items are done."""

    def advance(self, count: int = 1) -> None:
        """Record ``count`` more finished items."""


class _Silent:
    def advance(self, count: int = 1) -> None:
        return None


class _RichBar:
    def __init__(self, progress: object, task: object) -> None:
        self._progress = progress
        self._task = task

    def advance(self, count: int = 1) -> None:
        self._progress.advance(self._task, count)  # type: ignore[attr-defined]


def progress_enabled() -> bool:
    """Whether bars should be drawn (a terminal, and not switched off by ``PADIM_PROGRESS=0``)."""
    if os.environ.get("PADIM_PROGRESS", "").strip() == "0":
        return False
    return sys.stderr.isatty()


@contextmanager
def progress_bar(total: int | None, description: str) -> Iterator[Progress]:
    """Show a bar with a rate in images/s while the block runs.

    Args:
        total: Number of items, or ``None`` when unknown.
        description: Short label, e.g. ``"fit bottle"``.

    Yields:
        An object whose ``advance(n)`` records progress.
    """
    if not progress_enabled():
        yield _Silent()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _speed_column(),
        TimeRemainingColumn(),
    )
    with RichProgress(*columns, transient=False) as rich_progress:
        task = rich_progress.add_task(description, total=total)
        yield _RichBar(rich_progress, task)


def _speed_column() -> object:
    """A rich column showing images/s (blank until a rate is known)."""
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("   -.- img/s" if speed is None else f"{speed:6.1f} img/s")

    return SpeedColumn()
