"""Retry policy shared by every task: retry transient storage and network faults, not user errors."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from padim.errors import PadimError, StoreError

RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=2)
RETRY_JITTER = 0.5


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: storage/network faults are retried, user errors (bad input) are not.

    Args:
        task: The Prefect task.
        task_run: Its run.
        state: The failed state; its data is the raised exception.

    Returns:
        True to retry.
    """
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # an unreadable state: be safe and retry
        return True
    if isinstance(error, StoreError):
        return True
    return not isinstance(error, (PadimError, ValueError, TypeError))


TASK_OPTIONS: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_jitter_factor": RETRY_JITTER,
    "retry_condition_fn": is_transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
    "result_serializer": "json",
}
"""Keyword arguments of ``@task`` for every padim task."""

RESULT_OPTIONS: dict[str, Any] = {"persist_result": False, "result_serializer": "json"}
"""Keyword arguments of ``@flow`` for every padim flow.

Results stay in memory. Prefect still writes the exception of a *failed* run to its result
storage (``PREFECT_LOCAL_STORAGE_PATH``, by default ``$PREFECT_HOME/storage``) whatever
``persist_result`` says; with the JSON serializer that file is ``{"__exc_type__": ..., "message":
...}``, never a pickle (Prefect's default serializer is cloudpickle)."""
