"""Fault suite, part 2: storage failing mid-run, a run killed mid-way, two runs at once.

Storage faults use this module's own moto server (never the shared session one): the endpoint
is stopped for real while a score run writes its reports, or its calls are refused from the
moment a model's first file is stored. A killed run is a real ``SIGKILL`` of a ``python``
process running the score flow. Every test ends by counting report rows per image: none lost,
none duplicated. ``docs/reliability.md`` maps each fault to its test.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import padim_prefect.flows.score
import padim_prefect.tasks.scoring
import padim_prefect.tasks.training
import pytest
from padim_prefect.flows.runners import with_task_runner
from padim_prefect.flows.score import score
from padim_prefect.flows.train import train
from padim_prefect.tasks.scoring import already_scored_task, score_shard_task
from padim_prefect.tasks.storage import list_images_task, remove_work_area_task
from padim_prefect.tasks.training import finalize_and_publish_task, fit_shard_task

import padim.io.fsio
import padim.io.reading
import padim.jobs.inspection
from padim.errors import ConfigError, ImageReadError, IncompleteRunError, ModelNotFoundError, PadimError, StoreError
from padim.io.store import ModelStore
from padim.io.store_layout import COMPLETE_MARKER, LATEST_POINTER
from padim.reports import daily_summary, list_report_files, query_reports
from tests.reliability_support import (
    CHEAP_MODEL,
    DAY,
    PRODUCT,
    TrainedStore,
    fast_retries,
    local_dir,
    raw_report_rows,
    rows_per_image,
    trained_store,
    write_images,
)

pytest_plugins = ["tests.prefect_harness"]

REPO = Path(__file__).resolve().parents[1]
DELAYS = (0.2, 0.4, 0.8)
"""Retry delays the tests give the tasks (production: 2, 4, 8 s): same count, same doubling."""


RUNTIME_FAULTS: dict[str, str] = {
    "S3 refuses every call from the first stored model file on": (
        "test_s3_failing_while_a_model_is_published_retries_then_fails_and_nothing_becomes_latest"
    ),
    "S3 endpoint stopped after the first report file": (
        "test_s3_endpoint_stopping_mid_score_retries_then_fails_and_the_rerun_completes"
    ),
    "disk error renaming a report file": (
        "test_a_transient_disk_error_while_writing_a_report_is_retried_without_duplicates"
    ),
    "SIGKILL while the second report file is written": (
        "test_a_score_run_killed_mid_way_then_rerun_has_one_row_per_image"
    ),
    "two runs of the same night at once": "test_two_score_runs_of_the_same_night_at_once_show_one_row_per_image",
    "storage failing to deliver one night image": (
        "test_a_storage_fault_reading_an_image_fails_only_its_shard_then_the_rerun_completes"
    ),
    "storage failing twice, then delivering": "test_a_transient_read_fault_is_retried_inside_the_read",
    "storage hanging on one night image": "test_a_read_that_hangs_times_out_fails_its_shard_then_the_rerun_completes",
    "storage failing to deliver one training image": (
        "test_a_storage_fault_reading_a_training_image_fails_the_run_and_publishes_nothing"
    ),
    "SIGTERM to a running padim score": (
        "test_a_score_command_stopped_by_a_signal_ends_promptly_and_the_rerun_completes"
    ),
    "SIGINT to a running padim score": (
        "test_a_score_command_stopped_by_a_signal_ends_promptly_and_the_rerun_completes"
    ),
}
"""Faults injected while a flow runs, and the test that injects each."""


@pytest.fixture(scope="module")
def trained(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    """The session's trained store (a Prefect test server is up for the module)."""
    return trained_store(tmp_path_factory)


def test_the_production_retry_policy_is_three_retries_with_exponential_backoff() -> None:
    for task in (score_shard_task, already_scored_task, list_images_task, fit_shard_task, finalize_and_publish_task):
        assert task.retries == 3, task.name
        assert task.retry_delay_seconds == [2, 4, 8], task.name
        assert task.retry_condition_fn is not None, task.name


# ---- counting attempts ----------------------------------------------------------------------------


@dataclass
class Calls:
    """Calls of a wrapped library function: start time and the first URI of the shard it got."""

    calls: list[tuple[float, str]] = field(default_factory=list)

    def per_shard(self) -> Counter[str]:
        """Attempts per shard (keyed by its first image)."""
        return Counter(first for _, first in self.calls)

    def gaps(self, first_uri: str) -> list[float]:
        """Seconds between consecutive attempts of one shard."""
        starts = [t for t, first in self.calls if first == first_uri]
        return [b - a for a, b in itertools.pairwise(starts)]


def record_shard_attempts(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Record every attempt of the score task (the library call it wraps)."""
    calls = Calls()
    real = padim_prefect.tasks.scoring.score_shard

    def counted(store: Any, product: str, model_url: str, version: str, uris: list[str], *rest: Any) -> Any:
        calls.calls.append((time.monotonic(), uris[0]))
        return real(store, product, model_url, version, uris, *rest)

    monkeypatch.setattr(padim_prefect.tasks.scoring, "score_shard", counted)
    return calls


def assert_backoff(gaps: list[float]) -> None:
    """Three retries, spaced at least by the (shortened) doubling delays."""
    assert len(gaps) == len(DELAYS), gaps
    for gap, delay in zip(gaps, DELAYS, strict=True):
        assert gap >= delay * 0.95, (gaps, DELAYS)


@dataclass
class RowAudit:
    """Rows lost and duplicated over every run of this module that counted them."""

    runs: int = 0
    lost: int = 0
    duplicated: int = 0


ROW_AUDIT = RowAudit()
"""Filled by :func:`assert_one_row_per_image`; ``docs/reliability.md`` states these figures."""


def assert_one_row_per_image(store: str, images: list[str]) -> tuple[int, int]:
    """Exactly one row per image as users query it; returns (rows lost, rows duplicated).

    The counts are recorded in :data:`ROW_AUDIT` before they are asserted.
    """
    seen = rows_per_image(store)
    lost = len(set(images) - set(seen))
    duplicated = sum(count - 1 for count in seen.values())
    ROW_AUDIT.runs += 1
    ROW_AUDIT.lost += lost
    ROW_AUDIT.duplicated += duplicated
    assert (lost, duplicated) == (0, 0), seen
    assert set(seen) == set(images)
    return lost, duplicated


# ---- an S3 endpoint of our own ------------------------------------------------------------------------


@dataclass
class OwnS3:
    """A moto server this module starts, stops and restarts (its data live in the process)."""

    host: str
    port: int
    bucket: str
    server: Any = None

    @property
    def endpoint(self) -> str:
        """The endpoint URL."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Start (or restart, on the same port) the server."""
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        """Stop the server: every S3 call now fails to connect."""
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture()
def own_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[OwnS3]:
    """A private moto server and bucket, with botocore's own retries off so faults surface at once."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    probe = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    probe.start()
    host, port = probe.get_host_and_port()
    s3 = OwnS3(host=host, port=port, bucket=f"faults-{uuid.uuid4().hex[:12]}", server=probe)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(s3.bucket)
    try:
        yield s3
    finally:
        s3.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def upload_store(local_store: str, s3_store: str) -> None:
    """Copy a local store's files to an S3 prefix, object by object."""
    import s3fs

    fs = s3fs.S3FileSystem()
    for path in sorted(Path(local_store).rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{s3_store.removeprefix('s3://')}/{path.relative_to(local_store)}", path.read_bytes())


@dataclass
class Outage:
    """Refuse every S3 call (as a dead endpoint does) from the moment a trigger call succeeded."""

    endpoint: str
    key_fragment: str
    active: bool = False
    refused: int = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Wrap s3fs's single entry point to the S3 API."""
        import s3fs
        from botocore.exceptions import EndpointConnectionError

        real = s3fs.S3FileSystem._call_s3
        outage = self

        async def call_s3(fs: Any, method: str, *args: Any, **kwargs: Any) -> Any:
            if outage.active:
                outage.refused += 1
                raise EndpointConnectionError(endpoint_url=outage.endpoint)
            result = await real(fs, method, *args, **kwargs)
            if method == "put_object" and outage.key_fragment in str(kwargs.get("Key", "")):
                outage.active = True
            return result

        monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", call_s3)


# ---- storage faults ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_failing_while_a_model_is_published_retries_then_fails_and_nothing_becomes_latest(
    trained: TrainedStore, own_s3: OwnS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    store = f"s3://{own_s3.bucket}/store"
    fast_retries(monkeypatch, finalize_and_publish_task, remove_work_area_task, fit_shard_task, list_images_task)
    publishes = Calls()
    publish_errors: list[BaseException] = []
    real_publish = padim_prefect.tasks.training.finalize_and_publish

    def counted_publish(*args: Any, **kwargs: Any) -> Any:
        publishes.calls.append((time.monotonic(), "publish"))
        try:
            return real_publish(*args, **kwargs)
        except BaseException as exc:
            publish_errors.append(exc)
            raise

    monkeypatch.setattr(padim_prefect.tasks.training, "finalize_and_publish", counted_publish)
    outage = Outage(endpoint=own_s3.endpoint, key_fragment=f"/{PRODUCT}/models/")
    outage.install(monkeypatch)

    with pytest.raises(Exception, match="Could not connect to the endpoint URL") as raised:
        train(product=PRODUCT, normal_url=trained.normal, store=store, shard_size=6, **CHEAP_MODEL)

    assert outage.active and outage.refused > 0
    assert publishes.per_shard()["publish"] == 4  # the first try and three retries
    assert_backoff(publishes.gaps("publish"))
    assert isinstance(publish_errors[0], StoreError) and "nothing was published" in str(publish_errors[0])
    # The flow reports the publish failure itself, not the failed clean-up of the work area after it.
    assert raised.value is publish_errors[-1]
    outage.active = False  # the endpoint is back
    model_store = ModelStore(store)
    assert model_store.versions(PRODUCT) == []
    with pytest.raises(ModelNotFoundError):
        model_store.latest(PRODUCT)
    fs = s3fs.S3FileSystem()
    models = f"{own_s3.bucket}/store/{PRODUCT}/models"
    fs.invalidate_cache()
    leftovers = fs.find(models)
    assert leftovers, "the outage was meant to hit after the first model file was stored"
    assert not [p for p in leftovers if p.endswith((COMPLETE_MARKER, LATEST_POINTER))]
    assert model_store.delete_incomplete(PRODUCT, older_than_hours=0)
    fs.invalidate_cache()
    assert fs.find(models) == []


@pytest.mark.slow
def test_s3_endpoint_stopping_mid_score_retries_then_fails_and_the_rerun_completes(
    trained: TrainedStore, own_s3: OwnS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    store = f"s3://{own_s3.bucket}/store"
    upload_store(trained.store, store)
    images = write_images(local_dir(tmp_path / "night"), 6, seed=11, prefix="s3")
    fast_retries(monkeypatch, score_shard_task)
    attempts = record_shard_attempts(monkeypatch)
    real_write = padim.jobs.inspection.write_report_rows
    written: list[str] = []

    def write_then_stop(*args: Any, **kwargs: Any) -> list[str]:
        files = real_write(*args, **kwargs)
        written.extend(files)
        own_s3.stop()  # the endpoint dies right after the first shard's report landed
        return files

    monkeypatch.setattr(padim.jobs.inspection, "write_report_rows", write_then_stop)
    one_thread = with_task_runner(score, "threads", workers=1)
    night = str(tmp_path / "night")

    with pytest.raises(Exception, match="Could not connect to the endpoint URL"):
        one_thread(product=PRODUCT, images_url=night, store=store, date=DAY, device="cpu", shard_size=2)

    assert len(written) == 1
    per_shard = attempts.per_shard()
    assert per_shard[images[0]] == 1 and per_shard[images[2]] == 4, per_shard
    assert_backoff(attempts.gaps(images[2]))
    own_s3.start()  # the endpoint is back, with what it had stored
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(padim.jobs.inspection, "write_report_rows", real_write)
    partition = f"{own_s3.bucket}/store/reports/product={PRODUCT}/date={DAY}"
    assert [f"s3://{p}" for p in s3fs.S3FileSystem().find(partition)] == written  # no partial object
    assert sorted(query_reports(store, product=PRODUCT)["image_uri"]) == images[:2]

    rerun = score(product=PRODUCT, images_url=str(tmp_path / "night"), store=store, date=DAY, device="cpu")

    assert rerun["n_skipped"] == 2 and rerun["n_scored"] == 4
    assert_one_row_per_image(store, images)
    assert len(raw_report_rows(store)) == len(images)


def test_a_transient_disk_error_while_writing_a_report_is_retried_without_duplicates(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = trained.copy_to(tmp_path / "store")
    images = write_images(local_dir(tmp_path / "night"), 4, seed=12, prefix="disk")
    fast_retries(monkeypatch, score_shard_task)
    attempts = record_shard_attempts(monkeypatch)
    real_replace = os.replace
    failures: list[str] = []

    def replace_fails_once(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if str(dst).endswith(".parquet") and not failures:
            failures.append(str(dst))
            raise OSError(28, "No space left on device", str(dst))
        real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(padim.io.fsio.os, "replace", replace_fails_once)

    result = score(product=PRODUCT, images_url=str(tmp_path / "night"), store=store, date=DAY, device="cpu")

    assert len(failures) == 1 and attempts.per_shard()[images[0]] == 2
    assert result["n_scored"] == 4
    assert_one_row_per_image(store, images)
    assert len(raw_report_rows(store)) == len(images)
    partition = Path(store) / "reports" / f"product={PRODUCT}" / f"date={DAY}"
    assert [p.name for p in partition.iterdir() if p.name.startswith(".")] == []  # temporary file removed


# ---- a run killed mid-way ------------------------------------------------------------------------------

KILLED_RUN = """
import os, signal, sys

sys.path.insert(0, {repo!r})
real_replace = os.replace
reports = []


def replace_or_die(src, dst, *args, **kwargs):
    # The second shard's report is on disk under its temporary name: die before the rename.
    if str(dst).endswith(".parquet"):
        reports.append(dst)
        if len(reports) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)


os.replace = replace_or_die
from padim_prefect.flows.score import score

score(product={product!r}, images_url={images!r}, store={store!r}, date={day!r}, device="cpu", shard_size=2)
print("the run was not killed")
"""


def child_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a child flow process: this session's Prefect server, one task thread."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PADIM_PROGRESS="0",
        PADIM_TASK_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    return env


@pytest.mark.slow
def test_a_score_run_killed_mid_way_then_rerun_has_one_row_per_image(trained: TrainedStore, tmp_path: Path) -> None:
    store = trained.copy_to(tmp_path / "store")
    night = tmp_path / "night"
    images = write_images(local_dir(night), 8, seed=13, prefix="kill")
    script = tmp_path / "killed_score.py"
    script.write_text(KILLED_RUN.format(repo=str(REPO), product=PRODUCT, images=str(night), store=store, day=DAY))

    child = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=child_env(tmp_path), timeout=600
    )

    assert child.returncode == -signal.SIGKILL, child.stdout[-2000:] + child.stderr[-2000:]
    partition = Path(store) / "reports" / f"product={PRODUCT}" / f"date={DAY}"
    complete = [p for p in partition.iterdir() if p.suffix == ".parquet"]
    half_written = [p for p in partition.iterdir() if p.name.startswith(".")]
    assert len(complete) == 1 and len(half_written) == 1, sorted(p.name for p in partition.iterdir())
    assert len(list_report_files(store)) == 1  # the temporary file of the killed write is not a report
    before = query_reports(store, product=PRODUCT)
    assert len(before) == 2 and set(before["image_uri"]) <= set(images)

    rerun = score(product=PRODUCT, images_url=str(night), store=store, date=DAY, device="cpu", shard_size=2)

    assert rerun["n_skipped"] == 2 and rerun["n_scored"] == 6
    assert_one_row_per_image(store, images)
    assert len(raw_report_rows(store)) == len(images)  # no physical duplicate either
    assert (query_reports(store, product=PRODUCT)["status"] == "ok").all()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_score_command_stopped_by_a_signal_ends_promptly_and_the_rerun_completes(
    trained: TrainedStore, tmp_path: Path, stop: signal.Signals
) -> None:
    store = trained.copy_to(tmp_path / "store")
    night = tmp_path / "night"
    images = write_images(local_dir(night), 40, seed=15, prefix="signal")
    partition = Path(store) / "reports" / f"product={PRODUCT}" / f"date={DAY}"
    command = [sys.executable, "-m", "padim_cli.main", "score", "-p", PRODUCT, "--images", str(night)]
    command += ["--store", store, "--date", DAY, "--shard-size", "2", "--device", "cpu"]
    child = subprocess.Popen(
        command,
        cwd=REPO,
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )
    deadline = time.monotonic() + 300
    while not (partition.is_dir() and any(p.suffix == ".parquet" for p in partition.iterdir())):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    child.send_signal(stop)
    sent = time.monotonic()
    _, err = child.communicate(timeout=120)
    waited = time.monotonic() - sent

    assert child.returncode in (-stop, 128 + stop), (child.returncode, err[-2000:])
    assert waited < 30, f"the run took {waited:.1f} s to end after {stop.name}"
    assert "Traceback" not in err, err[-2000:]
    scored = query_reports(store, product=PRODUCT)
    assert scored["image_uri"].is_unique and len(scored) < len(images)  # stopped before the end
    rerun = score(product=PRODUCT, images_url=str(night), store=store, date=DAY, device="cpu", shard_size=8)
    assert rerun["n_skipped"] == len(scored) and rerun["n_scored"] == len(images) - len(scored)
    assert_one_row_per_image(store, images)


# ---- two runs at once ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_score_runs_of_the_same_night_at_once_show_one_row_per_image(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = trained.copy_to(tmp_path / "store")
    night = tmp_path / "night"
    images = write_images(local_dir(night), 4, 2, seed=14, prefix="twice")
    barrier = threading.Barrier(2, timeout=300)
    real_plan = padim_prefect.flows.score.plan_scoring

    def plan_together(*args: Any, **kwargs: Any) -> Any:
        barrier.wait()  # both runs have read "already scored" before either writes a row
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(padim_prefect.flows.score, "plan_scoring", plan_together)
    real_write = padim.jobs.inspection.write_report_rows
    written: list[int] = []

    def counted_write(store_url: str, rows: list[dict[str, Any]], **kwargs: Any) -> list[str]:
        files = real_write(store_url, rows, **kwargs)
        written.append(len(rows))
        return files

    monkeypatch.setattr(padim.jobs.inspection, "write_report_rows", counted_write)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(
                score(product=PRODUCT, images_url=str(night), store=store, date=DAY, device="cpu", shard_size=3)
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    assert errors == [] and len(results) == 2
    assert [r["n_scored"] for r in results] == [6, 6]  # both runs really scored every image ...
    assert sum(written) == 2 * len(images)  # ... and wrote a row for each: two rows per image ...
    assert_one_row_per_image(store, images)  # ... one as every query shows it
    assert len(raw_report_rows(store)) in (len(images), 2 * len(images))  # compacted or not, nothing lost
    summary = daily_summary(store, product=PRODUCT)
    assert summary["images"].tolist() == [len(images)]
    env = {**os.environ, "PADIM_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "padim_cli.main", "report", "--store", store, "--product", PRODUCT, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    cli_rows = json.loads(done.stdout)
    assert sorted(r["image_uri"] for r in cli_rows) == sorted(images)
    monkeypatch.setattr(padim_prefect.flows.score, "plan_scoring", real_plan)
    third = score(product=PRODUCT, images_url=str(night), store=store, date=DAY, device="cpu")
    assert third["n_skipped"] == len(images) and third["n_scored"] == 0


# ---- storage failing to deliver images -----------------------------------------------------------------


def fail_reads(monkeypatch: pytest.MonkeyPatch, uri: str, times: int | None = None) -> list[str]:
    """Make reading one local file fail like an unreachable store (``times`` reads, or always).

    Returns:
        A list that grows by one entry per failed read.
    """
    from fsspec.implementations.local import LocalFileSystem

    failures: list[str] = []
    real = LocalFileSystem.cat_file

    def flaky(self: LocalFileSystem, path: str, *args: Any, **kwargs: Any) -> bytes:
        if str(path).endswith(Path(uri).name) and (times is None or len(failures) < times):
            failures.append(str(path))
            raise ConnectionError("storage endpoint unreachable")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", flaky)
    monkeypatch.setattr(padim.io.reading, "READ_RETRY_WAIT_S", 0.01)
    return failures


def test_a_storage_fault_reading_an_image_fails_only_its_shard_then_the_rerun_completes(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = trained.copy_to(tmp_path / "store")
    night = local_dir(tmp_path / "night")
    images = write_images(night, 6, seed=15, prefix="io")  # shards of 2: the fault hits the second
    fast_retries(monkeypatch, score_shard_task)
    attempts = record_shard_attempts(monkeypatch)
    failures = fail_reads(monkeypatch, images[3])

    with pytest.raises(IncompleteRunError, match=r"2 of 6 images .* not scored") as raised:
        score(product=PRODUCT, images_url=night, store=store, date=DAY, device="cpu", shard_size=2)

    assert images[2] in str(raised.value) and "storage endpoint unreachable" in str(raised.value)
    assert attempts.per_shard()[images[2]] == 4  # the task ran once and was retried three times
    assert len(failures) == 4 * padim.io.reading.READ_ATTEMPTS  # each attempt re-read the file before giving up
    rows = query_reports(store, product=PRODUCT)
    assert sorted(rows["image_uri"]) == sorted(images[:2] + images[4:])  # the other shards' rows stand
    assert set(rows["status"]) == {"ok"}  # the fault is not disguised as a bad image
    monkeypatch.undo()  # the store is reachable again

    rerun = score(product=PRODUCT, images_url=night, store=store, date=DAY, device="cpu", shard_size=2)

    assert (rerun["n_scored"], rerun["n_skipped"]) == (2, 4)
    assert_one_row_per_image(store, images)


def test_a_transient_read_fault_is_retried_inside_the_read(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = trained.copy_to(tmp_path / "store")
    night = local_dir(tmp_path / "night")
    images = write_images(night, 3, seed=16, prefix="blip")
    attempts = record_shard_attempts(monkeypatch)
    failures = fail_reads(monkeypatch, images[1], times=padim.io.reading.READ_ATTEMPTS - 1)

    result = score(product=PRODUCT, images_url=night, store=store, date=DAY, device="cpu")

    assert len(failures) == padim.io.reading.READ_ATTEMPTS - 1
    assert result["n_scored"] == 3 and result["n_errors"] == 0
    assert attempts.per_shard()[images[0]] == 1  # no task retry was needed
    assert_one_row_per_image(store, images)


def test_a_read_that_hangs_times_out_fails_its_shard_then_the_rerun_completes(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that never answers (a hung mount, a stalled endpoint) is a storage fault after the timeout."""
    from fsspec.implementations.local import LocalFileSystem

    store = trained.copy_to(tmp_path / "store")
    night = local_dir(tmp_path / "night")
    images = write_images(night, 4, seed=19, prefix="hang")
    fast_retries(monkeypatch, score_shard_task)
    released = threading.Event()  # set at the end: the hung reads then return, and their threads end
    hung: list[str] = []
    real = LocalFileSystem.cat_file

    def hanging(self: LocalFileSystem, path: str, *args: Any, **kwargs: Any) -> bytes:
        if str(path).endswith(Path(images[1]).name):
            hung.append(str(path))
            released.wait(60)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", hanging)
    monkeypatch.setattr(padim.io.reading, "READ_RETRY_WAIT_S", 0.01)
    monkeypatch.setenv("PADIM_READ_TIMEOUT_S", "0.3")
    started = time.monotonic()
    try:
        with pytest.raises(IncompleteRunError, match=r"2 of 4 images .* not scored") as raised:
            score(product=PRODUCT, images_url=night, store=store, date=DAY, device="cpu", shard_size=2)
        elapsed = time.monotonic() - started
    finally:
        released.set()

    assert "no answer from storage within 0.3 s (PADIM_READ_TIMEOUT_S)" in str(raised.value)
    assert len(hung) == 4 * padim.io.reading.READ_ATTEMPTS  # 4 task attempts, each read 3 times, each timed out
    assert elapsed < 60  # bounded by the timeouts, not by the hung reads
    rows = query_reports(store, product=PRODUCT)
    assert sorted(rows["image_uri"]) == sorted(images[2:])  # the other shard's rows stand, no error rows
    monkeypatch.undo()

    rerun = score(product=PRODUCT, images_url=night, store=store, date=DAY, device="cpu", shard_size=2)

    assert (rerun["n_scored"], rerun["n_skipped"]) == (2, 2)
    assert_one_row_per_image(store, images)


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_a_bad_read_timeout_setting_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PADIM_READ_TIMEOUT_S", value)
    with pytest.raises(ConfigError, match="PADIM_READ_TIMEOUT_S must be a positive number of seconds"):
        padim.io.reading.read_timeout_s()


def test_a_storage_fault_reading_a_training_image_fails_the_run_and_publishes_nothing(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    normal = local_dir(tmp_path / "normal")
    images = write_images(normal, 16, seed=17, prefix="fit")
    store = str(tmp_path / "store")
    fast_retries(monkeypatch, fit_shard_task, finalize_and_publish_task)
    fail_reads(monkeypatch, images[-1])

    with pytest.raises(ImageReadError, match="storage endpoint unreachable"):
        train(product=PRODUCT, normal_url=normal, store=store, shard_size=4, **CHEAP_MODEL)

    assert ModelStore(store).versions(PRODUCT) == []
    assert not list(Path(store).rglob("*.safetensors"))  # no partial statistics left behind


@pytest.mark.parametrize(("limit", "published"), [(0.1, False), (0.3, True)])
def test_training_refuses_to_publish_when_too_many_images_are_unusable(
    prefect_harness: None, tmp_path: Path, limit: float, published: bool
) -> None:
    normal = Path(local_dir(tmp_path / "normal"))
    write_images(str(normal), 16, seed=18, prefix="skip")
    for i in range(4):  # 4 of 20 listed images (20 %) cannot be decoded
        (normal / f"skip-broken-{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    store = str(tmp_path / "store")
    kwargs = {"product": PRODUCT, "normal_url": str(normal), "store": store, "max_skipped_fraction": limit}

    if not published:
        with pytest.raises(
            PadimError, match=r"4 of 20 training images \(20%\) could not be used.*max_skipped_fraction"
        ):
            train(**kwargs, **CHEAP_MODEL)
        assert ModelStore(store).versions(PRODUCT) == []
        return
    result = train(**kwargs, **CHEAP_MODEL)
    assert result["n_failed"] == 4 and result["n_train"] == 16
    assert sorted(f["uri"].rsplit("/", 1)[-1] for f in result["failed"]) == [f"skip-broken-{i}.png" for i in range(4)]
    assert all("corrupt" in f["reason"] for f in result["failed"]), result["failed"]


def test_an_image_read_error_survives_being_sent_between_processes() -> None:
    import pickle

    error = ImageReadError("s3://bucket/a.png", "EndpointConnectionError: could not connect")
    copy = pickle.loads(pickle.dumps(error))  # what Dask does with a worker's exception
    assert isinstance(copy, ImageReadError) and isinstance(copy, StoreError)
    assert (copy.uri, copy.reason, str(copy)) == (error.uri, error.reason, str(error))


def test_store_errors_are_retried_and_user_errors_are_not() -> None:
    """The retry condition the storage tests rely on."""
    from botocore.exceptions import EndpointConnectionError
    from padim_prefect.tasks.policy import is_transient
    from prefect.states import Failed

    from padim.errors import ImageSourceError, IncompatibleModelError

    def state(error: BaseException) -> Any:
        return Failed(data=error)

    assert is_transient(None, None, state(StoreError("cannot write")))
    assert is_transient(None, None, state(EndpointConnectionError(endpoint_url="http://x")))
    assert is_transient(None, None, state(OSError("disk")))
    assert not is_transient(None, None, state(IncompatibleModelError("other backbone")))
    assert not is_transient(None, None, state(ImageSourceError("no such folder")))
    assert not is_transient(None, None, state(ValueError("NaN")))
    assert is_transient(None, None, state(ImageReadError("s3://b/a.png", "timeout")))


def test_every_runtime_fault_has_its_test() -> None:
    for fault, test in RUNTIME_FAULTS.items():
        assert callable(globals().get(test)), f"{fault}: no test {test}"


def test_the_reliability_document_states_the_measured_row_counts() -> None:
    """``docs/reliability.md``'s rows lost / duplicated are what this module's runs counted."""
    if ROW_AUDIT.runs < 5:
        pytest.skip(f"only {ROW_AUDIT.runs} fault runs counted rows in this session (run the whole module)")
    text = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert f"| rows lost | {ROW_AUDIT.lost} |" in text, ROW_AUDIT
    assert f"| rows duplicated | {ROW_AUDIT.duplicated} |" in text, ROW_AUDIT
    assert f"| fault runs that counted rows | {ROW_AUDIT.runs} |" in text, ROW_AUDIT
