"""One Prefect test harness per session: load this module as a plugin, not by importing the fixture.

In a test module::

    pytest_plugins = ["tests.prefect_harness"]

(a session fixture *imported* into several modules is set up once per module). ``prefect_harness``
starts ``prefect_test_harness`` once (a temporary SQLite API server in a subprocess: 6-9 s on an
idle machine), with the flow heartbeat off, server analytics off, a raised startup timeout and
progress bars off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

SERVER_STARTUP_TIMEOUT = 90
"""Seconds the temporary Prefect server may take to start on a busy shared machine."""

_ENV: dict[str, str | None] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": None,  # unset: no heartbeat
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(SERVER_STARTUP_TIMEOUT),
    "PADIM_PROGRESS": "0",
}


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Run every flow of the session against one temporary Prefect API server.

    The settings are also exported to the environment, so that the server subprocess and Dask
    worker processes see them.
    """
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    saved = {name: os.environ.get(name) for name in _ENV}
    _set_environment(_ENV)
    settings = {
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: SERVER_STARTUP_TIMEOUT,
    }
    try:
        with temporary_settings(updates=settings), prefect_test_harness(server_startup_timeout=SERVER_STARTUP_TIMEOUT):
            yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, str | None]) -> None:
    """Set (or, for ``None``, unset) environment variables."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
