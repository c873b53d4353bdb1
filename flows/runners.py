"""Choosing the task runner: bounded threads by default, Dask for several processes or machines.

Per deployment: set ``PADIM_TASK_RUNNER=dask`` (and ``PADIM_DASK_ADDRESS=tcp://scheduler:8786`` for
an existing cluster, else a LocalCluster of ``PADIM_DASK_WORKERS`` processes) in the work pool's or
deployment's environment. Per run: :func:`with_task_runner`, which the command line uses for
``--dask``.

Determinism: the float32 reductions of some CNNs (EfficientNet-Lite0's depthwise convolutions)
depend on the number of intra-op threads, and Dask's nanny starts worker processes with
``OMP_NUM_THREADS=1``. A LocalCluster's workers therefore get the flow process's intra-op thread
count, so a shard embeds to the same bits on either runner and the float64 statistics agree to
rounding of the merge. Workers of an existing cluster (``address``) should be started with the same
``OMP_NUM_THREADS`` as the process they are compared with.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from prefect.task_runners import ThreadPoolTaskRunner

from padim.errors import ConfigError
from padim.settings import RunnerSettings, default_of

RunnerKind = Literal["threads", "dask"]
DEFAULT_THREADS: int = default_of(RunnerSettings, "task_threads")
DEFAULT_DASK_WORKERS: int = default_of(RunnerSettings, "dask_workers")


def make_task_runner(kind: RunnerKind = "threads", address: str | None = None, workers: int | None = None) -> Any:
    """Build a task runner.

    Args:
        kind: ``"threads"`` (a bounded thread pool) or ``"dask"``.
        address: Dask scheduler address (``tcp://host:8786``); ``None`` starts a LocalCluster.
        workers: Threads (threads) or worker processes (Dask LocalCluster).

    Returns:
        A Prefect task runner.

    Raises:
        ConfigError: For an unknown kind, or Dask requested without ``prefect-dask`` installed.
    """
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers or DEFAULT_THREADS)
    if kind != "dask":
        raise ConfigError(f"unknown task runner {kind!r}; use 'threads' or 'dask'")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise ConfigError("the Dask runner needs the dask extra: pip install 'padim-inspect[dask]'") from exc
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers or DEFAULT_DASK_WORKERS,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "env": worker_thread_env(),
        }
    )


def worker_thread_env() -> dict[str, str]:
    """Environment giving worker processes this process's intra-op thread count.

    Returns:
        ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set to ``torch.get_num_threads()``.
    """
    import torch

    threads = str(torch.get_num_threads())
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def task_runner_from_env() -> Any:
    """The task runner named by ``PADIM_TASK_RUNNER`` / ``PADIM_DASK_ADDRESS`` / ``PADIM_DASK_WORKERS``.

    Returns:
        A Prefect task runner (bounded threads when nothing is set).
    """
    kind = os.environ.get("PADIM_TASK_RUNNER", "threads").strip() or "threads"
    variable = "PADIM_DASK_WORKERS" if kind == "dask" else "PADIM_TASK_THREADS"
    workers = os.environ.get(variable, "").strip()
    if workers and (not workers.isdigit() or int(workers) < 1):
        raise ConfigError(f"{variable} must be a whole number of at least 1, got {workers!r}")
    return make_task_runner(kind, os.environ.get("PADIM_DASK_ADDRESS") or None, int(workers) if workers else None)  # type: ignore[arg-type]


def with_task_runner(
    flow: Any, kind: RunnerKind = "threads", address: str | None = None, workers: int | None = None
) -> Any:
    """A copy of ``flow`` that runs its tasks on another runner.

    Args:
        flow: A Prefect flow.
        kind: ``"threads"`` or ``"dask"``.
        address: Dask scheduler address, if any.
        workers: Threads or Dask worker processes.

    Returns:
        The flow with the runner.
    """
    return flow.with_options(task_runner=make_task_runner(kind, address, workers))
