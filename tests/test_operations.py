"""Running unattended: loud misconfiguration, readable flow-run names, summaries, no pickled results.

The flows run through the Prefect test harness with the cheap random-weights model of
``tests/flow_helpers.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from padim_prefect.flows.nightly import nightly

from padim.errors import ConfigError, PadimError
from padim.io.store import ModelStore
from padim.jobs.products import update_product_settings
from tests.flow_helpers import CHEAP_MODEL, flow_run_warnings, local_dir, write_images

pytest_plugins = ["tests.prefect_harness"]

DAY = "2026-11-24"


@pytest.fixture(scope="module")
def trained_store(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """A store with ``line`` trained (no incoming folder configured yet)."""
    from padim_prefect.flows.train import train

    root = tmp_path_factory.mktemp("ops")
    normal = local_dir(root / "normal")
    write_images(normal, 12, seed=51)
    store = ModelStore(str(root / "store"))
    train(product="line", normal_url=normal, store=store.root, **CHEAP_MODEL)
    return store


def flow_run_names(*names: str) -> list[str]:
    """Which of the given flow-run names exist on the API server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=list(names))))
    return sorted({run.name for run in runs})


def latest_markdown(key: str) -> str:
    """The newest markdown artifact with a key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
        )
    return str(artifacts[0].data)


# ---- a misconfigured worker fails, naming what to fix --------------------------------------------------


def test_a_store_that_does_not_exist_fails_naming_padim_store(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PADIM_STORE", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"does not exist \(PADIM_STORE of the process running the flow\)"):
        nightly(date=DAY)
    monkeypatch.delenv("PADIM_STORE")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"PADIM_STORE is unset .* so the default ./padim-store.*set PADIM_STORE"):
        nightly(date=DAY)


def test_an_empty_store_fails_naming_padim_store(prefect_harness: None, tmp_path: Path) -> None:
    empty = local_dir(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"holds no model \(the run's `store` parameter\); set PADIM_STORE"):
        nightly(store=empty, date=DAY)


def test_no_configured_product_fails_naming_incoming_url(trained_store: ModelStore) -> None:
    with pytest.raises(ConfigError, match=r"has an incoming folder \(incoming_url\).*padim configure"):
        nightly(store=trained_store.root, date=DAY)


def test_nights_scored_nothing_arrived_and_a_missing_incoming_folder(trained_store: ModelStore, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    update_product_settings(trained_store, "line", incoming_url=str(incoming / "{date}"))
    write_images(str(incoming / DAY), 3, seed=52)

    night = nightly(store=trained_store.root, date=DAY, device="cpu")

    assert night["products"]["line"]["n_scored"] == 3
    assert flow_run_names(f"nightly-{DAY}", f"score-line-{DAY}") == [f"nightly-{DAY}", f"score-line-{DAY}"]
    summary = latest_markdown("nightly-summary")
    assert f"# Nightly inspection {DAY}" in summary and "| line | scored | 3 | 3 |" in summary

    # Nothing arrived the next night: the run completes with a warning and says so.
    with flow_run_warnings() as warnings:
        quiet = nightly(store=trained_store.root, date="2026-11-25", device="cpu")
    assert quiet["products"]["line"]["nothing_arrived"] and quiet["products"]["line"]["n_scored"] == 0
    assert any("nothing arrived tonight" in w and "2026-11-25" in w for w in warnings), warnings
    assert "**Nothing arrived tonight** for line" in latest_markdown("nightly-summary")

    # An empty folder for the night is the same.
    local_dir(incoming / "2026-11-26")
    assert nightly(store=trained_store.root, date="2026-11-26", device="cpu")["products"]["line"]["nothing_arrived"]

    # The incoming folder itself is gone: the run fails, naming the setting.
    shutil.rmtree(incoming)
    with pytest.raises(PadimError, match="nightly scoring failed for line"):
        nightly(store=trained_store.root, date="2026-11-27", device="cpu")
    summary = latest_markdown("nightly-summary")
    assert "incoming folder of product 'line' not found" in summary and "incoming_url" in summary


def test_drift_bounds_of_a_product_reach_its_score_run(trained_store: ModelStore, tmp_path: Path) -> None:
    incoming = tmp_path / "drift"
    update_product_settings(
        trained_store, "line", incoming_url=str(incoming / "{date}"), drift_min_images=2, drift_max_median_ratio=1.01
    )
    write_images(str(incoming / DAY), 0, n_defect=3, seed=53)
    try:
        night = nightly(store=trained_store.root, date=DAY, device="cpu", drift_min_images=50)
    finally:
        update_product_settings(trained_store, "line", drift_min_images=None)
    drift = night["products"]["line"]["drift"]
    assert drift["detected"], drift  # 3 images are judged: the product's minimum (2) wins over the run's (50)


# ---- failed runs leave no pickle ----------------------------------------------------------------------


def test_a_failed_flow_run_leaves_no_pickled_result(prefect_harness: None, tmp_path: Path) -> None:
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    storage = tmp_path / "prefect-storage"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), pytest.raises(ConfigError):
        nightly(store=str(tmp_path / "nowhere"), date=DAY)
    files = [p for p in storage.rglob("*") if p.is_file()]
    assert files, "Prefect wrote no record of the failure: the test no longer checks anything"
    for path in files:
        raw = path.read_bytes()
        assert not raw.startswith(b"\x80"), f"{path} is a pickle"
        record: Any = json.loads(raw)
        assert record["__exc_type__"] == "padim.errors.ConfigError", record
