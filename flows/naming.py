"""Flow-run names people can read in the Prefect UI: ``nightly-2026-11-28``, ``score-bottle-2026-11-28``.

Prefect calls these when a flow run starts (``@flow(flow_run_name=...)``); they read the run's
parameters from :mod:`prefect.runtime`. A date left out is the production date the run computes
itself (today in UTC, minus ``days_ago`` for the nightly run); train and retrain runs carry the
date they ran.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any

from prefect.runtime import flow_run


def run_day(parameters: dict[str, Any]) -> str:
    """The production date of a run from its parameters (``date``, ``days_ago``), as ``YYYY-MM-DD``."""
    given = parameters.get("date")
    if isinstance(given, date):
        return given.isoformat()
    if isinstance(given, str) and given:
        return given
    days_ago = parameters.get("days_ago") or 0
    return (datetime.now(timezone.utc).date() - timedelta(days=int(days_ago))).isoformat()


def today() -> str:
    """Today's date in UTC, ``YYYY-MM-DD``."""
    return datetime.now(timezone.utc).date().isoformat()


def nightly_run_name() -> str:
    """``nightly-<date>``."""
    return f"nightly-{run_day(flow_run.parameters)}"


def score_run_name() -> str:
    """``score-<product>-<date>``."""
    parameters = flow_run.parameters
    return f"score-{parameters.get('product')}-{run_day(parameters)}"


def train_run_name() -> str:
    """``train-<product>-<today>``."""
    return f"train-{flow_run.parameters.get('product')}-{today()}"


def retrain_run_name() -> str:
    """``retrain-<product>-<today>``."""
    return f"retrain-{flow_run.parameters.get('product')}-{today()}"


def watch_run_name() -> str:
    """``watch-<today>``."""
    return f"watch-{today()}"
