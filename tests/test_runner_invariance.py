"""The product gives the same models and scores whatever runner executes its Prefect tasks.

What a plant that outgrows one machine runs, end to end on S3 (moto): images, model store,
reports and heat maps in one bucket; a Dask scheduler and two workers started as separate
``dask scheduler`` / ``dask worker`` processes (``tests/dask_cluster.py``); the shipped backbone
(EfficientNet-Lite0 with its packaged ImageNet weights, the whole image at 224 px) on the CPU, with
40 of its 176 channels (:data:`CHANNELS`): the same code paths (per-stage channel selection, cell
statistics, banded scoring) with a model and partial statistics 19x smaller than the default's,
which matters because all of them travel through moto's single in-process server.

What was learned by experiment (Prefect 3.9, prefect-dask 0.3, distributed 2026.8, 2 cores):

* **The Prefect API URL travels with each task.** ``DaskTaskRunner(address=...)`` submits every
  task with ``serialize_context()``, which includes the flow's settings context, so task runs and
  their logs reach the test harness's temporary server although the workers' environment has no
  ``PREFECT_API_URL`` (the fixture removes it on purpose; the assertions on the task runs below
  check that it still works). A worker needs the package and the store, as the README says, not
  the API URL.
* **Workers import the project from the editable install.** Started with the test's interpreter
  (``.venv/bin/python -m distributed.cli.dask_worker``) in an unrelated working directory, they
  import ``padim`` / ``flows`` / ``tasks`` (the tasks are pickled by reference). Anything defined
  in a test module is not importable there (``No module named 'tests'``): a probe sent with
  ``Client.run`` needs ``cloudpickle.register_pickle_by_value``.
* **The nanny keeps an inherited OMP_NUM_THREADS, and it matters.** ``distributed.nanny.
  pre-spawn-environ`` sets ``OMP_NUM_THREADS=1`` only when the variable is not already in the
  nanny's environment, so exporting it to ``dask worker`` gives the worker processes the test
  process's ``torch.get_num_threads()`` (2 here). Started without it, the external workers
  embed with one thread: the scores then differ from the threads runner's by up to 3e-7
  relative (inside the score tolerance) but the statistics' ``mean`` by 5.3e-6 (1.7e-7 of its
  magnitude), which the 1e-9 statistics check catches. With it, and on the LocalCluster
  (:func:`padim_prefect.flows.runners.worker_thread_env`), the scores are bit-identical to the threads
  runner's.
* **A default ``distributed.Client`` in the flow's process hijacks the LocalCluster runner.**
  ``DaskTaskRunner`` without an address first asks ``distributed.get_client()``; a client to
  another cluster that is the process's default makes ``--dask local`` run on that cluster. The
  test's own client is therefore made with ``set_as_default=False``, and the test checks that the
  LocalCluster run put no task on the external scheduler.
* **``dask scheduler --no-dashboard`` still listens on 0.0.0.0:8787** (the HTTP server for health
  and metrics routes); the fixture passes ``--dashboard-address 127.0.0.1:0``.
* **A fresh worker's first task blocks its event loop for 15-20 s**: unpickling it imports
  Prefect, torch and ``padim`` (distributed logs "Event loop was unresponsive"); each worker
  then loads the scoring model from the store once (a per-process LRU).
* **Time.** With every channel (d = 176) a version holds 0.4 GB (``statistics.safetensors``,
  395 MB float64; the scoring factor is rebuilt from it on load) and each fit shard writes a
  partial of the statistics' size, all through moto's single in-process server: the test took 4.5-7 minutes on
  the shared 2-core machine (train with threads 74-90 s against 33 s on a local store), which is
  why it keeps 40 channels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pandas as pd
import pytest
from padim_prefect.flows.runners import with_task_runner
from padim_prefect.flows.score import score
from padim_prefect.flows.train import train

from padim.io.artifact import read_training_images
from padim.reports import list_report_files, query_reports
from tests.flow_helpers import max_abs_difference, read_statistics, write_images
from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401

if TYPE_CHECKING:
    from tests.dask_cluster import ExternalCluster

pytest.importorskip("prefect_dask")  # the dask extra (with distributed)

pytest_plugins = ["tests.prefect_harness", "tests.dask_cluster"]

PRODUCT = "plate"
CHANNELS = 40
"""Embedding channels of the test's model (see the module docstring)."""
SHARD_SIZE = 7
N_TRAIN = 20  # 10 held out to calibrate, 10 fitted in 2 shards (7 + 3)
N_NIGHT_NORMAL = 26
N_NIGHT_DEFECT = 4  # 30 images: 5 score shards (7, 7, 7, 7, 2)
IMAGE_SIZE = 96
DAYS = {"threads": "2026-11-23", "dask-local": "2026-11-24", "dask-external": "2026-11-25"}
"""One report partition per run: the score flow skips images already scored the same night."""

SCORE_RTOL = 1e-5
STATISTICS_RTOL = 1e-9
COMPARED = ["image_uri", "score", "is_anomaly", "max_x", "max_y"]


def completed_task_runs(flow_run_id: Any) -> list[str]:
    """Task names of a flow run's completed task runs, from the Prefect API.

    Args:
        flow_run_id: The flow run's id.

    Returns:
        One name per completed task run (``score_shard_task``, ...).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run.task_key.rsplit("-", 1)[0] for run in runs if run.state is not None and run.state.is_completed()]


@contextmanager
def task_stream(client: Any) -> Iterator[list[dict[str, Any]]]:
    """Record the tasks the external scheduler runs meanwhile, from any client.

    Args:
        client: A ``distributed.Client`` of the external cluster.

    Yields:
        A list that holds ``{"key", "worker", ...}`` per finished task once the block ends.
    """
    import distributed

    records: list[dict[str, Any]] = []
    with distributed.get_task_stream(client=client) as stream:
        yield records
    records.extend(stream.data)


def tasks_by_worker(records: list[dict[str, Any]], name: str) -> dict[str, int]:
    """How many tasks of one Prefect task function each Dask worker ran."""
    counts: dict[str, int] = {}
    for record in records:
        if str(record["key"]).startswith(f"{name}-"):
            counts[record["worker"]] = counts.get(record["worker"], 0) + 1
    return counts


def report_of(store: str, day: str, uris: list[str]) -> pd.DataFrame:
    """One run's report rows, checked to hold exactly one row per image of the night.

    Args:
        store: Store root.
        day: The run's date (its report partition).
        uris: The night's images.

    Returns:
        The compared columns, indexed by image URI.
    """
    rows = query_reports(store, product=PRODUCT, since=day, until=day)
    assert sorted(rows["image_uri"]) == sorted(uris), f"{day}: report rows are not one per image: {len(rows)} rows"
    assert set(rows["status"]) == {"ok"}, f"{day}: rows not ok: {rows[rows['status'] != 'ok'][['image_uri', 'error']]}"
    assert rows["run_id"].nunique() == 1, f"{day}: rows of several runs: {sorted(rows['run_id'].unique())}"
    raw = 0
    for file in list_report_files(
        store, product=PRODUCT, since=pd.Timestamp(day).date(), until=pd.Timestamp(day).date()
    ):
        raw += pd.read_parquet(file.url).shape[0]
    assert raw == len(uris), f"{day}: {raw} rows in the partition's files for {len(uris)} images (duplicates?)"
    return rows[COMPARED].set_index("image_uri").sort_index()


def assert_same_scores(expected: pd.DataFrame, actual: pd.DataFrame, label: str) -> None:
    """Assert two runs' reports agree per image (scores to :data:`SCORE_RTOL`, the rest exactly)."""
    assert list(actual.index) == list(expected.index), f"{label}: different images"
    scores = pd.DataFrame({"expected": expected["score"].astype(float), "actual": actual["score"].astype(float)})
    scores["rel"] = (scores["actual"] - scores["expected"]).abs() / scores["expected"].abs()
    off = scores[~(scores["rel"] <= SCORE_RTOL)]
    assert off.empty, f"{label}: scores differ by more than {SCORE_RTOL:g} relative:\n{off.to_string()}"
    for column in ("is_anomaly", "max_x", "max_y"):
        differ = expected[column].astype(object) != actual[column].astype(object)
        assert not differ.any(), (
            f"{label}: {column} differs:\n"
            + pd.DataFrame({"expected": expected[column], "actual": actual[column], "score": expected["score"]})[
                differ
            ].to_string()
        )


def relative_differences(reports: dict[str, pd.DataFrame], runner: str) -> pd.Series:
    """Per image, the relative difference of a runner's score from the threads runner's."""
    expected = reports["threads"]["score"].astype(float)
    return (reports[runner]["score"].astype(float) - expected).abs() / expected.abs()


@pytest.mark.slow
def test_scores_and_statistics_do_not_depend_on_the_task_runner(
    s3_endpoint: str,  # noqa: F811
    prefect_harness: None,
    s3_bucket: str,  # noqa: F811
    dask_cluster: ExternalCluster,
) -> None:
    """Threads, a LocalCluster and an external cluster give the same scores and statistics.

    Trains once with threads, scores one night three ways (threads, Dask LocalCluster, external
    scheduler with two workers), each into its own date, and trains once more on the external
    cluster; the reports agree per image and the statistics to float64 rounding.
    """
    import distributed

    normal = f"{s3_bucket}/images/normal"
    night = f"{s3_bucket}/images/night"
    store = f"{s3_bucket}/padim-store"
    write_images(normal, N_TRAIN, seed=11, size=IMAGE_SIZE)
    uris = write_images(night, N_NIGHT_NORMAL, N_NIGHT_DEFECT, seed=12, size=IMAGE_SIZE)
    n_shards = math.ceil(len(uris) / SHARD_SIZE)
    assert n_shards > 1, "the night must need more than one score shard"
    train_options = {
        "normal_url": normal,
        "store": store,
        "shard_size": SHARD_SIZE,
        "device": "cpu",
        "channels": CHANNELS,
    }
    score_options = {"product": PRODUCT, "images_url": night, "store": store, "shard_size": SHARD_SIZE, "device": "cpu"}
    seconds: dict[str, float] = {}

    def timed(label: str, run: Any, **kwargs: Any) -> Any:
        """Run a flow, keep its duration, and fail at once (with the flow's error) if it failed."""
        start = time.perf_counter()
        state = run(return_state=True, **kwargs)
        seconds[label] = time.perf_counter() - start
        state.result()
        return state

    trained_state = timed(
        "train threads", with_task_runner(train, "threads", workers=2), product=PRODUCT, **train_options
    )
    trained = trained_state.result()
    n_fit_shards = math.ceil((trained["n_train"] - trained["n_calibration"]) / SHARD_SIZE)
    assert n_fit_shards > 1, f"the training must need more than one fit shard: {trained}"

    states = {}
    with distributed.Client(dask_cluster.address, set_as_default=False) as client:
        states["threads"] = timed(
            "score threads", with_task_runner(score, "threads", workers=4), date=DAYS["threads"], **score_options
        )
        with task_stream(client) as on_external_during_local:
            states["dask-local"] = timed(
                "score dask local", with_task_runner(score, "dask", workers=2), date=DAYS["dask-local"], **score_options
            )
        with task_stream(client) as score_stream:
            states["dask-external"] = timed(
                "score dask external",
                with_task_runner(score, "dask", address=dask_cluster.address),
                date=DAYS["dask-external"],
                **score_options,
            )
        with task_stream(client) as train_stream:
            dask_trained_state = timed(
                "train dask external",
                with_task_runner(train, "dask", address=dask_cluster.address),
                product=f"{PRODUCT}-dask",
                **train_options,
            )
    print("seconds per run:", {k: round(v, 1) for k, v in seconds.items()})

    # every run scored every image once, in more than one shard, and its tasks reported to the API
    summaries = {runner: state.result() for runner, state in states.items()}
    for runner, summary in summaries.items():
        assert summary["n_images"] == len(uris) > SHARD_SIZE, f"{runner}: {summary['n_images']} images"
        assert summary["n_scored"] == len(uris) and summary["n_skipped"] == 0, f"{runner}: {summary}"
        assert summary["model_version"] == trained["version"], f"{runner}: scored {summary['model_version']}"
        names = completed_task_runs(states[runner].state_details.flow_run_id)
        assert names.count("score_shard_task") == n_shards, f"{runner}: completed task runs {sorted(names)}"

    # the external run's shards ran on the external workers, on both; the LocalCluster run on none
    assert not on_external_during_local, (
        f"the LocalCluster run put tasks on the external scheduler: {[r['key'] for r in on_external_during_local]}"
    )
    per_worker = tasks_by_worker(score_stream, "score_shard_task")
    assert sum(per_worker.values()) == n_shards, f"score shards per external worker: {per_worker}"
    assert set(per_worker) == set(dask_cluster.worker_addresses), (
        f"score shards ran on {per_worker}, not on both workers {dask_cluster.worker_addresses}"
    )

    # the reports agree per image
    reports = {runner: report_of(store, DAYS[runner], uris) for runner in states}
    flagged = set(reports["threads"].index[reports["threads"]["is_anomaly"].astype(bool)])
    defects = {uri for uri in uris if "-defect-" in uri}
    assert defects <= flagged, f"defects not flagged (the night would test little): {sorted(defects - flagged)}"
    for runner in ("dask-local", "dask-external"):
        print(f"threads vs {runner}: largest relative score difference", relative_differences(reports, runner).max())
        assert_same_scores(reports["threads"], reports[runner], f"threads vs {runner}")

    # training on the external cluster: the same statistics, images and thresholds
    dask_trained = dask_trained_state.result()
    fit_per_worker = tasks_by_worker(train_stream, "fit_shard_task")
    assert sum(fit_per_worker.values()) == n_fit_shards, f"fit shards per external worker: {fit_per_worker}"
    assert set(fit_per_worker) <= set(dask_cluster.worker_addresses), fit_per_worker
    names = completed_task_runs(dask_trained_state.state_details.flow_run_id)
    assert names.count("fit_shard_task") == n_fit_shards, (
        f"completed task runs of the external training: {sorted(names)}"
    )
    a = read_statistics(trained["url"])
    b = read_statistics(dask_trained["url"])
    assert int(a["n"]) == int(b["n"]) == trained["n_train"] == dask_trained["n_train"], (int(a["n"]), int(b["n"]))
    diff = max_abs_difference(a, b)
    print("statistics, largest absolute difference threads vs external:", diff)
    for key, value in diff.items():
        magnitude = float(a[key].double().abs().max())
        assert value <= STATISTICS_RTOL * magnitude, (
            f"statistics {key} differ by {value:.3g} (max |value| {magnitude:.3g}): all differences {diff}"
        )
    assert read_training_images(dask_trained["url"]) == read_training_images(trained["url"])
    for key in ("image_threshold", "pixel_threshold"):
        assert dask_trained[key] == pytest.approx(trained[key], rel=SCORE_RTOL), (key, trained[key], dask_trained[key])
