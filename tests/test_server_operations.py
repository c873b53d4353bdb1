"""Operations on a real Prefect server: the work-pool route and ``padim serve``, in either order.

Starts ``prefect server start`` on a free port (its own ``PREFECT_HOME``), creates the process work
pool, runs ``prefect deploy --all`` with the project's ``deployments/prefect.yaml``, and drives the
deployments through the server's REST API the way the UI or ``prefect deployment run`` would: a
worker runs train -> nightly -> a new landing batch -> watch -> the event-triggered retrain -> the
promotion gate, and a nightly with a store that does not exist fails naming it; then ``padim serve``
takes over the same deployments (it used to leave them routed to the pool without code, and every
run crashed) and ``prefect deploy`` routes them back to the pool. The runs are checked for their
state, their names (``nightly-DATE``...), the report rows, the versions and the artifacts.

Slow (a server, a worker and a dozen Python processes that import torch): about 5 minutes on an idle
2-core machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from padim.io.store import ModelStore
from padim.jobs.products import update_product_settings
from padim.reports import query_reports
from tests.flow_helpers import CHEAP_MODEL, write_images

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "padim-process"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
STARTUP_TIMEOUT_S = 240
RUN_TIMEOUT_S = 600
NIGHT = (date.today() - timedelta(days=3)).isoformat()
TRAIN_PARAMETERS = {k: v for k, v in CHEAP_MODEL.items()}


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """A running Prefect server and the environment its clients, workers and flow runs share."""

    api: str
    env: dict[str, str]
    store: str
    root: Path
    log: Path

    def command(self, *args: str, timeout: float = 300) -> str:
        """Run a ``prefect``/``padim`` command against the server; fail the test on a non-zero status."""
        done = subprocess.run(
            [str(BIN / args[0]), *args[1:]],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def start(self, *args: str, name: str) -> subprocess.Popen[bytes]:
        """Start a long-running ``prefect``/``padim`` process (a worker, ``padim serve``)."""
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("POST", path, body)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call; a busy server's 503 (its SQLite database locked) is retried, as Prefect's client does."""
        for attempt in range(6):
            response = httpx.request(method, f"{self.api}{path}", json=body, timeout=30)
            if response.status_code != 503:
                break
            time.sleep(0.5 * 2**attempt)
        response.raise_for_status()
        return response.json()

    def deployment(self, full_name: str) -> dict[str, Any]:
        return self.get(f"/deployments/name/{full_name}")

    def run(self, full_name: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """Create a run of a deployment, as the UI does, and wait for its end."""
        deployment = self.deployment(full_name)
        flow_run = self.post(f"/deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})
        return self.wait(flow_run["id"])

    def wait(self, flow_run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            flow_run = self.get(f"/flow_runs/{flow_run_id}")
            if flow_run["state"]["type"] in TERMINAL:
                return flow_run
            assert time.monotonic() < deadline, f"flow run {flow_run['name']} still {flow_run['state']['type']}"
            time.sleep(1)

    def runs_of(self, full_name: str) -> list[dict[str, Any]]:
        """Every flow run of a deployment, oldest first."""
        deployment = self.deployment(full_name)
        body = {"deployments": {"id": {"any_": [deployment["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"}
        return self.post("/flow_runs/filter", body)

    def logs(self, flow_run: dict[str, Any], expect: str = "", timeout: float = 60) -> str:
        """A flow run's log messages; with ``expect``, waited for until one contains it.

        A run's state can reach the server before its last log lines, which its process sends in
        batches as it ends.
        """
        deadline = time.monotonic() + timeout
        while True:
            body = {"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
            text = "\n".join(entry["message"] for entry in self.post("/logs/filter", body))
            if expect in text or time.monotonic() > deadline:
                return text
            time.sleep(1)

    def artifacts(self, flow_run: dict[str, Any]) -> list[dict[str, Any]]:
        return self.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a worker or ``padim serve`` and everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def wait_until_healthy(api: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"the Prefect server did not start within {STARTUP_TIMEOUT_S} s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real Prefect server with the process pool and every deployment of prefect.yaml deployed."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PADIM_"))}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.3",
        PADIM_STORE=str(root / "store"),
        PADIM_PROJECT_DIR=str(REPO),
        PADIM_PROGRESS="0",
        PADIM_TASK_THREADS="1",
        PADIM_CACHE=str(root / "cache"),
        PYTHONWARNINGS="ignore",
    )
    log = root / "server.log"
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=root,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Server(api=api, env=env, store=env["PADIM_STORE"], root=root, log=log)
    try:
        wait_until_healthy(api, process, log)
        running.command("prefect", "work-pool", "create", POOL, "--type", "process")
        running.command("prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        yield running
    finally:
        stop(process)


@pytest.fixture
def worker(server: Server) -> Iterator[subprocess.Popen[bytes]]:
    """A process worker of the pool, stopped after the test."""
    process = server.start("prefect", "worker", "start", "--pool", POOL, name="worker")
    try:
        yield process
    finally:
        stop(process)


DEPLOYMENTS = (
    "padim-nightly/nightly",
    "padim-retrain/retrain",
    "padim-watch/watch",
    "padim-train/train",
    "padim-score/score",
)


def declared(server: Server) -> dict[str, Any]:
    """What a deployment route declares on the server: schedules, parameters, limits and triggers."""
    shape = {}
    for full_name in DEPLOYMENTS:
        deployment = server.deployment(full_name)
        schedules = [
            {k: v for k, v in entry["schedule"].items() if k != "anchor_date"} | {"active": entry["active"]}
            for entry in deployment["schedules"]
        ]
        shape[full_name] = {
            "schedules": schedules,
            "parameters": deployment["parameters"],
            "concurrency_limit": deployment.get("global_concurrency_limit", {}).get("limit")
            if deployment.get("global_concurrency_limit")
            else deployment.get("concurrency_limit"),
            "tags": sorted(deployment["tags"]),
            "description": deployment["description"],
        }
    automations = server.post("/automations/filter", {})
    shape["triggers"] = sorted(
        (a["name"], a["enabled"], repr(sorted(a["trigger"].get("expect", []))), repr(a["trigger"].get("for_each")))
        for a in automations
    )
    return shape


def is_served(server: Server, full_name: str) -> bool:
    """Whether a deployment exists and is routed to no work pool."""
    try:
        return server.deployment(full_name)["work_pool_name"] is None
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 404:  # between its deletion and its creation by padim serve
            return False
        raise


def completed(server: Server, flow_run: dict[str, Any]) -> dict[str, Any]:
    """Assert a flow run completed; on failure show its state and logs."""
    state = flow_run["state"]
    assert state["type"] == "COMPLETED", (
        f"{flow_run['name']}: {state['type']} {state.get('message')}\n" + server.logs(flow_run)[-4000:]
    )
    return flow_run


def test_the_pool_route_trains_scores_the_night_and_retrains_from_a_landing_batch(
    server: Server, worker: subprocess.Popen[bytes]
) -> None:
    product = "widget"
    normal = server.root / "normal"
    incoming = server.root / "incoming"
    landing = server.root / "landing"
    write_images(str(normal), 16, seed=1, prefix="fit")
    night = write_images(str(incoming / NIGHT), 5, n_defect=2, seed=2, prefix="night")
    store = ModelStore(server.store)

    trained = completed(
        server, server.run("padim-train/train", {"product": product, "normal_url": str(normal), **TRAIN_PARAMETERS})
    )
    first = store.latest(product)
    assert trained["work_pool_name"] == POOL

    update_product_settings(store, product, incoming_url=f"{incoming}/{{date}}", landing_url=str(landing))
    nightly = completed(server, server.run("padim-nightly/nightly", {"date": NIGHT}))
    rows = query_reports(server.store, product=product)
    assert sorted(rows["image_uri"]) == sorted(night) and set(rows["status"]) == {"ok"}
    assert nightly["work_pool_name"] == POOL
    assert nightly["name"] == f"nightly-{NIGHT}"  # named for the UI, not "cute-bear"
    assert "nightly-summary" in {a["key"] for a in server.artifacts(nightly)}
    scored = server.post("/flow_runs/filter", {"flow_runs": {"name": {"any_": [f"score-{product}-{NIGHT}"]}}})
    assert len(scored) == 1 and scored[0]["state"]["type"] == "COMPLETED"

    write_images(str(landing / "batch-1"), 12, seed=3, prefix="new")
    retrains_before = len(server.runs_of("padim-retrain/retrain"))
    completed(server, server.run("padim-watch/watch", {"settle_seconds": 0}))
    deadline = time.monotonic() + 120
    while len(server.runs_of("padim-retrain/retrain")) == retrains_before:  # the event trigger fires
        assert time.monotonic() < deadline, "no retrain run was triggered by padim.normal-images.added"
        time.sleep(1)
    retrain = completed(server, server.wait(server.runs_of("padim-retrain/retrain")[-1]["id"]))
    assert retrain["parameters"]["product"] == product
    assert retrain["parameters"]["normal_url"].rstrip("/").endswith("batch-1")
    versions = [info.version for info in store.versions(product)]
    assert len(versions) == 2 and first in versions  # a new version was published ...
    assert "promotion gate" in server.logs(retrain, expect="promotion gate")  # ... through the gate
    assert retrain["name"].startswith(f"retrain-{product}-")


def test_a_nightly_on_a_store_that_does_not_exist_fails_naming_it(
    server: Server, worker: subprocess.Popen[bytes]
) -> None:
    missing = str(server.root / "no-such-store")
    nightly = server.run("padim-nightly/nightly", {"date": NIGHT, "store": missing})

    assert nightly["state"]["type"] == "FAILED"  # not "Completed" with nothing scored
    logs = server.logs(nightly, expect="does not exist")
    assert f"store {missing} does not exist" in logs and "PADIM_STORE" in logs, logs[-3000:]


def test_serve_after_deploy_runs_the_deployments_then_deploy_routes_them_back(server: Server) -> None:
    product = "served"
    normal = server.root / "served-normal"
    write_images(str(normal), 16, seed=4, prefix="fit")

    from_pool = declared(server)
    assert len(from_pool["triggers"]) == 2, from_pool["triggers"]  # retrain: new normal images, drift
    serving = server.start("padim", "serve", name="serve")
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not is_served(server, "padim-train/train"):  # serve deleted the pool's and created its own
            assert serving.poll() is None and time.monotonic() < deadline, (server.root / "serve.log").read_text()
            time.sleep(1)
        trained = completed(
            server, server.run("padim-train/train", {"product": product, "normal_url": str(normal), **TRAIN_PARAMETERS})
        )
        assert trained["work_pool_name"] is None  # run by the serving process, not a worker
        assert all(is_served(server, name) for name in DEPLOYMENTS)
        assert declared(server) == from_pool  # the same deployments, declared once in prefect.yaml
        assert ModelStore(server.store).latest(product)
        assert "work-pool deployment is replaced by a served one" in (server.root / "serve.log").read_text()
    finally:
        stop(serving)

    server.command("prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
    assert server.deployment("padim-train/train")["work_pool_name"] == POOL
    process = server.start("prefect", "worker", "start", "--pool", POOL, name="worker-2")
    try:
        again = completed(
            server, server.run("padim-train/train", {"product": product, "normal_url": str(normal), **TRAIN_PARAMETERS})
        )
        assert again["work_pool_name"] == POOL
    finally:
        stop(process)
