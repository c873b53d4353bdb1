"""An external Dask cluster for tests: a scheduler and workers started as separate processes.

Load this module as a plugin (it holds a reporting hook as well as the fixture)::

    pytest_plugins = ["tests.prefect_harness", "tests.dask_cluster"]

``dask_cluster`` starts ``dask scheduler`` and :data:`N_WORKERS` ``dask worker`` processes (one
thread each, on 127.0.0.1) the way a plant runs a cluster that outgrows one machine, with the
interpreter of the test process (``python -m distributed.cli.dask_worker``), so that the editable
``padim`` / ``flows`` / ``tasks`` install is importable there; their working directory is a
temporary folder, so nothing is imported from the checkout by accident (``tests`` is not
importable on the workers).

The processes inherit the test process's environment at the time the fixture starts: request
``s3_endpoint`` and ``prefect_harness`` (session scope, so set up first) to give them the moto
endpoint, the dummy credentials and the harness's exported Prefect settings. Two changes:
``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` are set to this process's ``torch.get_num_threads()``
(see :func:`padim_prefect.flows.runners.worker_thread_env`: the nanny would otherwise start each worker with one
intra-op thread, and EfficientNet-Lite0 then embeds to different bits), and ``PREFECT_API_URL``
is removed: Prefect's Dask task runner sends the flow's settings (the API URL included) with every
task, which a test of the workers should rely on rather than on a developer's shell.

Every process writes its stdout and stderr to ``<tmp>/<name>.log``; when a test that uses the
fixture fails, the tails of these logs are added to its report ("dask cluster logs"). Teardown
sends SIGTERM to the workers, waits, kills their process groups (SIGKILL), then does the same to
the scheduler, also when the test failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

N_WORKERS = 2
"""Worker processes the fixture starts."""

START_TIMEOUT = 90.0
"""Seconds the scheduler and the workers may take to come up on a busy 2-core machine."""

STOP_TIMEOUT = 15.0
"""Seconds a process may take to exit after SIGTERM before it is killed."""

IDLE_TIMEOUT = 900
"""Seconds without a task after which the scheduler ends itself: pytest-timeout's limit, so that a
test that runs its first task on the cluster late never loses it; the workers follow it after their
``--death-timeout``."""

LOG_TAIL_LINES = 40
"""Lines of each process log shown when a test fails."""


@dataclass
class ExternalCluster:
    """A running external Dask cluster.

    Attributes:
        address: The scheduler's address (``tcp://127.0.0.1:PORT``).
        scheduler_file: The scheduler file the workers connected with.
        worker_addresses: The addresses of the registered workers.
        logs: Log file of each process, by process name.
        env: The environment the processes were started with (beyond the test process's own).
    """

    address: str
    scheduler_file: Path
    worker_addresses: list[str]
    logs: dict[str, Path]
    env: dict[str, str] = field(default_factory=dict)

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of every process log.

        Args:
            lines: Lines per log.

        Returns:
            One block per process, headed by its name and log path.
        """
        blocks = []
        for name, path in self.logs.items():
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError as exc:
                text = [f"(cannot read: {exc})"]
            blocks.append(f"---- {name} ({path}) ----\n" + "\n".join(text))
        return "\n".join(blocks)


def _start(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start one cluster process in its own process group, output to ``log``."""
    with log.open("wb") as handle:
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def _stop(processes: list[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT) -> None:
    """Terminate processes started by :func:`_start`, then kill their groups if anything is left.

    All get SIGTERM at once and share one deadline. The worker command is a nanny that spawns the
    worker process; both are in the group whose id is the nanny's pid, so the group kill also ends
    a worker whose nanny died first.
    """
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(max(0.1, deadline - time.monotonic()))
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)


def _wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Wait until the scheduler wrote its scheduler file (JSON), failing early if it exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Dask scheduler exited with code {process.returncode} before it started")
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:  # being written
                pass
        time.sleep(0.2)
    raise TimeoutError(f"the Dask scheduler wrote no {path} within {timeout:.0f} s")


@pytest.fixture()
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExternalCluster]:
    """Start a Dask scheduler and :data:`N_WORKERS` workers as separate processes.

    Yields:
        The running cluster; every process is stopped afterwards, whatever the test did.

    Raises:
        RuntimeError: A process exited or the workers did not register in time (with the logs).
    """
    import distributed
    import torch

    root = tmp_path_factory.mktemp("dask-cluster")
    scheduler_file = root / "scheduler.json"
    threads = str(torch.get_num_threads())
    extra = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}
    env.update(extra)
    processes: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    try:
        logs["scheduler"] = root / "scheduler.log"
        scheduler = _start(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--scheduler-file",
                str(scheduler_file),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",  # the HTTP server (health, metrics) still starts: keep it off :8787
                "--dashboard-address",
                "127.0.0.1:0",
                "--idle-timeout",
                f"{IDLE_TIMEOUT}s",  # ends the scheduler (then the workers) if the test process was killed
            ],
            logs["scheduler"],
            env,
            root,
        )
        processes["scheduler"] = scheduler
        info = _wait_for_file(scheduler_file, scheduler, START_TIMEOUT)
        for i in range(N_WORKERS):
            name = f"worker-{i}"
            logs[name] = root / f"{name}.log"
            processes[name] = _start(
                [
                    sys.executable,
                    "-m",
                    "distributed.cli.dask_worker",
                    "--scheduler-file",
                    str(scheduler_file),
                    "--host",
                    "127.0.0.1",
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--name",
                    name,
                    "--no-dashboard",
                    "--local-directory",
                    str(root / name),
                    "--death-timeout",
                    "60",  # the worker ends itself if the scheduler is gone
                ],
                logs[name],
                env,
                root,
            )
        cluster = ExternalCluster(info["address"], scheduler_file, [], logs, extra)
        try:
            with distributed.Client(scheduler_file=str(scheduler_file), set_as_default=False) as client:
                client.wait_for_workers(N_WORKERS, timeout=START_TIMEOUT)
                cluster.worker_addresses = sorted(client.scheduler_info()["workers"])
        except Exception as exc:
            dead = [f"{name} (code {p.returncode})" for name, p in processes.items() if p.poll() is not None]
            raise RuntimeError(
                f"the Dask cluster did not start ({exc}); exited: {dead or 'none'}\n{cluster.log_tails()}"
            ) from exc
        yield cluster
    finally:
        _stop([p for name, p in processes.items() if name != "scheduler"])  # workers first
        _stop([p for name, p in processes.items() if name == "scheduler"])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Add the cluster's log tails to the report of a failed test that used ``dask_cluster``."""
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "funcargs", {}).get("dask_cluster")
    if report.failed and isinstance(cluster, ExternalCluster):
        report.sections.append(("dask cluster logs", cluster.log_tails()))
