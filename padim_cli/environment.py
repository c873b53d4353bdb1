"""Process settings the command line applies before Prefect is imported.

Prefect reads its settings from the environment when it is first imported, so
:func:`apply_defaults` must run before any ``flows`` or ``prefect`` import. Values the user has set
are never overridden.
"""

from __future__ import annotations

import logging
import os

__all__ = [
    "DEBUG_ENV",
    "PREFECT_DEFAULTS",
    "VERBOSE_ENV",
    "apply_defaults",
    "debug_enabled",
    "quiet_prefect_console",
    "verbose_enabled",
]

DEBUG_ENV = "PADIM_DEBUG"
VERBOSE_ENV = "PADIM_VERBOSE"

PREFECT_DEFAULTS: dict[str, str] = {
    # No telemetry from an offline factory network (it also causes "database is locked" noise),
    # neither from the temporary server nor from the client (which also prints a notice on a TTY).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # The temporary local server Prefect starts per process needs more than the default 20 s on a
    # busy machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}

QUIET_CONSOLE_ENV = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _flag(name: str) -> bool:
    """Whether an environment variable is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def debug_enabled() -> bool:
    """Whether full tracebacks were asked for (``--debug`` or ``PADIM_DEBUG=1``)."""
    return _flag(DEBUG_ENV)


def verbose_enabled() -> bool:
    """Whether Prefect's run logs should reach the terminal (``--verbose`` or ``PADIM_VERBOSE=1``)."""
    return _flag(VERBOSE_ENV)


def apply_defaults(verbose: bool = False, debug: bool = False) -> None:
    """Set the environment defaults of a command-line run (values already set are kept).

    Args:
        verbose: Show Prefect's flow and task logs (INFO) on the terminal.
        debug: Print full tracebacks for errors.
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    if debug:
        os.environ[DEBUG_ENV] = "1"
    for name, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if verbose_enabled():
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    else:
        # Inherited by every process of a run (Dask workers, the temporary server): their console
        # copy of the logs stays quiet; the logs still reach the Prefect API.
        os.environ.setdefault(QUIET_CONSOLE_ENV, "CRITICAL")


class _HideRunLogs(logging.Filter):
    """Drops flow- and task-run records and anything below WARNING from a console handler.

    The command line prints its own summary and a one-line error; Prefect's console copy of the
    run logs (with the failure tracebacks) would repeat it. The records still reach the Prefect
    API, so a real server's UI shows the full logs. (By default the console handler's level is
    CRITICAL anyway, see :func:`apply_defaults`; the filter also holds when a user lowers it.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep warnings and errors of anything but the run loggers."""
        return record.levelno >= logging.WARNING and not record.name.startswith(_RUN_LOGGERS)


def quiet_prefect_console() -> None:
    """Keep Prefect's console output to warnings outside flow runs, unless verbose.

    Call after importing Prefect (which installs its console handler).
    """
    if verbose_enabled():
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("uvicorn", "fastapi", "prefect"))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, _HideRunLogs) for f in handler.filters
            ):
                handler.addFilter(_HideRunLogs())
