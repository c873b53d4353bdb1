"""The Prefect flows end to end on a local store: train, score, retrain, watch, nightly, Dask.

Every flow runs against one temporary Prefect API server per session (``prefect_harness``), with
a cheap model (ResNet18 with seeded random weights, 56 px input, d = 16) on small generated
textures, so a flow run costs a few seconds on a CPU.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import padim_prefect.tasks.storage
import pandas as pd
import pytest
from padim_prefect.flows.nightly import nightly
from padim_prefect.flows.retrain import retrain
from padim_prefect.flows.runners import with_task_runner
from padim_prefect.flows.score import score
from padim_prefect.flows.train import train
from padim_prefect.flows.watch import watch
from padim_prefect.tasks.events import (
    DRIFT_DETECTED,
    INSPECTION_COMPLETED,
    MODEL_PUBLISHED,
    NORMAL_IMAGES_ADDED,
)
from pydantic import ValidationError

import padim.core.backbones
from padim.core.config import PadimConfig
from padim.errors import ConfigError, InvalidProductNameError, ModelNotFoundError, PadimError
from padim.io.artifact import read_training_images, save_model
from padim.io.store import ModelStore
from padim.jobs.engine import fit_images
from padim.jobs.landing import list_batches, marker_url
from padim.jobs.products import read_product_settings, update_product_settings
from padim.jobs.training import plan_training
from padim.reports import query_reports, scored_images
from padim.settings import TrainSettings
from tests.flow_helpers import (
    CHEAP_MODEL,
    events_named,
    local_dir,
    max_abs_difference,
    read_statistics,
    record_events,
    write_images,
)

pytest_plugins = ["tests.prefect_harness"]  # one harness per session, however many modules use it

PRODUCT = "bottle"
DAY = "2026-11-25"
N_NORMAL = 16
SHARD_SIZE = 4


@dataclass
class Trained:
    """The module's shared model: a store with ``bottle`` trained on ``normal``."""

    root: Path
    store: str
    normal: str
    result: dict[str, Any]
    backbone_loads: list[tuple[str, str | None, str]]

    @property
    def model_store(self) -> ModelStore:
        """The store."""
        return ModelStore(self.store)


@pytest.fixture(scope="module")
def backbone_loads() -> Iterator[list[tuple[str, str | None, str]]]:
    """Count backbone constructions in this process, starting from an empty backbone cache."""
    calls: list[tuple[str, str | None, str]] = []
    real = padim.core.backbones.load_backbone

    def counting(
        name: str, weights: str | None = None, device: Any = "cpu", *rest: Any
    ) -> padim.core.backbones.Backbone:
        calls.append((name, weights, str(device)))
        return real(name, weights, device, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(padim.core.backbones, "_CACHE", {})
        patch.setattr(padim.core.backbones, "load_backbone", counting)
        yield calls


@pytest.fixture(scope="module")
def trained(
    prefect_harness: None,
    tmp_path_factory: pytest.TempPathFactory,
    backbone_loads: list[tuple[str, str | None, str]],
) -> Trained:
    """Train ``bottle`` once for the module (thread runner, several shards)."""
    root = tmp_path_factory.mktemp("flows")
    normal = local_dir(root / "normal")
    write_images(normal, N_NORMAL, seed=1)
    store = str(root / "store")
    result = train(product=PRODUCT, normal_url=normal, store=store, shard_size=SHARD_SIZE, **CHEAP_MODEL)
    return Trained(root=root, store=store, normal=normal, result=result, backbone_loads=backbone_loads)


def train_kwargs(**overrides: Any) -> dict[str, Any]:
    """Cheap train-flow options, with overrides."""
    return {**CHEAP_MODEL, "shard_size": SHARD_SIZE, **overrides}


def clone_product(source: ModelStore, product: str, target: ModelStore, new_product: str) -> str:
    """Publish a copy of a product's latest model under another product (no refit).

    Returns:
        The new version.
    """
    from padim.io.artifact import load_model

    model = load_model(source.latest_url(product), with_statistics=True)
    return target.publish(new_product, lambda url: save_model(model, url))


def rows_of(store: str, product: str, day: str) -> pd.DataFrame:
    """The report rows of one product and day (deduplicated)."""
    return query_reports(store, product=product, since=day, until=day)


def task_run_names(flow_run_id: Any) -> list[str]:
    """Names of the task runs of a flow run, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run.task_key.rsplit("-", 1)[0] for run in runs if run.state is not None and run.state.is_completed()]


def artifact_markdown(key: str) -> list[str]:
    """The contents of the markdown artifacts with a key, newest first, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
        )
    return [str(a.data) for a in artifacts if a.type == "markdown"]


# ---- train and score ------------------------------------------------------------------------------


def test_train_publishes_a_version_and_loads_the_cnn_once(trained: Trained) -> None:
    store = trained.model_store
    result = trained.result
    versions = store.versions(PRODUCT)
    assert [v.version for v in versions] == [result["version"]]
    assert versions[0].is_latest
    assert store.latest(PRODUCT) == result["version"]
    listed = sorted(os.path.join(trained.normal, name) for name in os.listdir(trained.normal))
    plan = plan_training(listed, TrainSettings(shard_size=SHARD_SIZE))
    assert len(plan.fit_shards) >= 2
    # The held-out images set the thresholds (scored out of sample), then join the statistics.
    assert result["n_calibration"] == len(plan.holdout) > 0
    assert result["n_train"] == plan.n_fit + len(plan.holdout) == N_NORMAL
    images = read_training_images(result["url"])
    assert len(images["fit"]) == result["n_train"] and len(images["calibration"]) == result["n_calibration"]
    assert {u for u, _ in images["calibration"]} == set(plan.holdout)
    assert {u for u, _ in images["calibration"]} <= {u for u, _ in images["fit"]}
    assert result["image_threshold"] > 0
    # partial statistics are cleaned up; the product remembers its normal folder
    work = Path(trained.store) / PRODUCT / "work"
    assert not work.exists() or not any(work.iterdir())
    assert read_product_settings(store, PRODUCT).normal_url == trained.normal
    assert result["version"] in artifact_markdown("model-bottle")[0]
    # several fit shards, one finalisation and the calibration pass: a single CNN construction
    assert trained.backbone_loads == [("resnet18", "random", "cpu")]


def test_score_end_to_end_then_rerun_adds_no_rows(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    events = record_events(monkeypatch)
    night = local_dir(trained.root / "night")
    uris = write_images(night, 5, 2, seed=2)
    corrupt = os.path.join(night, "img-truncated.png")
    with open(uris[-1], "rb") as handle:
        Path(corrupt).write_bytes(handle.read()[:100])
    version = trained.result["version"]

    first = score(product=PRODUCT, images_url=night, store=trained.store, date=DAY, device="cpu", shard_size=3)

    rows = rows_of(trained.store, PRODUCT, DAY)
    assert sorted(rows["image_uri"]) == sorted([*uris, corrupt])  # exactly one row per image
    by_uri = rows.set_index("image_uri")
    assert by_uri.loc[corrupt, "status"] == "error" and by_uri.loc[corrupt, "error"]
    ok = rows[rows["status"] == "ok"]
    assert len(ok) == len(uris)
    assert set(ok["model_version"]) == {version}
    assert np.isfinite(ok["score"].astype(float)).all()
    defects = [u for u in uris if "defect" in u]
    assert by_uri.loc[defects, "is_anomaly"].all(), by_uri[["score", "threshold"]]
    for _, row in ok.iterrows():
        assert bool(row["is_anomaly"]) == (row["score"] > row["threshold"])
        if row["is_anomaly"]:
            assert row["heatmap_uri"] and os.path.isfile(row["heatmap_uri"])
            assert row["heatmap_uri"].startswith(os.path.join(trained.store, PRODUCT, "heatmaps", DAY))
        else:
            assert not isinstance(row["heatmap_uri"], str)
    assert first["model_version"] == version
    assert first["n_images"] == len(uris) + 1
    assert first["n_scored"] == len(uris) and first["n_errors"] == 1 and first["n_skipped"] == 0
    assert first["n_anomalies"] == int(ok["is_anomaly"].sum()) >= len(defects)
    assert first["report_files"] and all(os.path.isfile(f) for f in first["report_files"])
    assert first["top"][0]["image_uri"] in defects
    assert len(events_named(events, INSPECTION_COMPLETED)) == 1
    summary = artifact_markdown("inspection-bottle")[0]
    assert version in summary and "Top anomalies" in summary and defects[0] in summary
    assert "[heat map](" not in summary  # a browser cannot open a local store's files: they are named instead
    assert f"`{first['top'][0]['heatmap_uri']}`" in summary and first["top"][0]["heatmap_link"] is None

    second = score(product=PRODUCT, images_url=night, store=trained.store, date=DAY, device="cpu", shard_size=3)

    assert len(rows_of(trained.store, PRODUCT, DAY)) == len(rows)
    assert scored_images(trained.store, PRODUCT, version) == set(uris)
    assert second["n_skipped"] == len(uris)  # every scored image is skipped ...
    assert second["n_scored"] == 0 and second["n_errors"] == 1  # ... the unreadable one is retried
    assert second["n_anomalies"] == 0
    # scoring reused the process's CNN
    assert trained.backbone_loads == [("resnet18", "random", "cpu")]


def test_drift_is_detected_when_most_images_are_defective(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    events = record_events(monkeypatch)
    night = local_dir(trained.root / "night-drift")
    write_images(night, 2, 20, seed=5, prefix="drift")

    result = score(
        product=PRODUCT, images_url=night, store=trained.store, date="2026-11-26", device="cpu", heatmaps=False
    )

    assert result["n_scored"] == 22 and result["n_anomalies"] >= 20
    assert result["drift"]["detected"] and result["drift"]["reasons"]
    assert result["drift"]["anomaly_rate"] >= 20 / 22
    drift = events_named(events, DRIFT_DETECTED)
    assert len(drift) == 1
    assert drift[0]["resource"]["padim.product"] == PRODUCT
    assert drift[0]["payload"]["reasons"] == result["drift"]["reasons"]
    assert rows_of(trained.store, PRODUCT, "2026-11-26")["heatmap_uri"].isna().all()


def test_score_of_normal_images_reports_no_drift(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    events = record_events(monkeypatch)
    night = local_dir(trained.root / "night-normal")
    write_images(night, 20, seed=6, prefix="calm")

    result = score(product=PRODUCT, images_url=night, store=trained.store, date="2026-11-27", device="cpu")

    assert result["n_scored"] == 20
    assert result["n_anomalies"] <= 4, result["top"]
    # The bulk of a normal night scores like the calibration images; the anomaly-rate bound is not
    # asserted because five held-out images set the threshold near their maximum.
    assert result["drift"]["median_ratio"] < 1.2 and result["drift"]["anomaly_rate"] <= 0.2, result["drift"]
    assert len(events_named(events, DRIFT_DETECTED)) == int(result["drift"]["detected"])
    assert len(events_named(events, INSPECTION_COMPLETED)) == 1


# ---- parameters are checked before any work ---------------------------------------------------------


def _missing(trained: Trained) -> str:
    return str(trained.root / "no-such-folder")


BAD_CALLS: dict[str, tuple[Callable[[Trained], Any], type[Exception], str]] = {
    "score unknown product": (
        lambda t: score(product="nosuch", images_url=t.normal, store=t.store, date="2026-12-01"),
        ModelNotFoundError,
        "no model for product 'nosuch'",
    ),
    "score product without a model": (
        lambda t: (
            update_product_settings(t.model_store, "configured", incoming_url=t.normal),
            score(product="configured", images_url=t.normal, store=t.store, date="2026-12-01"),
        ),
        ModelNotFoundError,
        "no model for product 'configured'",
    ),
    "score missing folder": (
        lambda t: score(product=PRODUCT, images_url=_missing(t), store=t.store, date="2026-12-01"),
        ConfigError,
        "production images folder not found",
    ),
    "score unknown protocol": (
        lambda t: score(product=PRODUCT, images_url="nope://night", store=t.store, date="2026-12-01"),
        ConfigError,
        "not a usable path or URL",
    ),
    "score invalid product name": (
        lambda t: score(product="../x", images_url=t.normal, store=t.store, date="2026-12-01"),
        InvalidProductNameError,
        "../x",
    ),
    "score invalid device": (
        lambda t: score(product=PRODUCT, images_url=t.normal, store=t.store, date="2026-12-01", device="tpu"),
        ValidationError,
        "device must be auto, cpu or cuda",
    ),
    "score bad date": (
        lambda t: score(product=PRODUCT, images_url=t.normal, store=t.store, date="01/12/2026"),
        ConfigError,
        "YYYY-MM-DD",
    ),
    "train missing folder": (
        lambda t: train(product="fresh", normal_url=_missing(t), store=t.store, **train_kwargs()),
        ConfigError,
        "normal images folder not found",
    ),
    "train folder is a file": (
        lambda t: train(
            product="fresh", normal_url=sorted(Path(t.normal).iterdir())[0].as_posix(), store=t.store, **train_kwargs()
        ),
        ConfigError,
        "is a file, not a folder",
    ),
    "train invalid product name": (
        lambda t: train(product="../x", normal_url=t.normal, store=t.store, **train_kwargs()),
        InvalidProductNameError,
        "../x",
    ),
    "train invalid device": (
        lambda t: train(product="fresh", normal_url=t.normal, store=t.store, **train_kwargs(device="gpu")),
        ValidationError,
        "device must be auto, cpu or cuda",
    ),
    "train unknown backbone": (
        lambda t: train(product="fresh", normal_url=t.normal, store=t.store, **train_kwargs(backbone="vgg16")),
        ConfigError,
        "invalid model options",
    ),
    "train unknown store protocol": (
        lambda t: train(product="fresh", normal_url=t.normal, store="nope://store", **train_kwargs()),
        ConfigError,
        "store 'nope://store' is not a usable path or URL",
    ),
    "retrain unknown product": (
        lambda t: retrain(product="nosuch", normal_url=t.normal, store=t.store, device="cpu"),
        ModelNotFoundError,
        "no model for product 'nosuch'",
    ),
    "retrain missing folder": (
        lambda t: retrain(product=PRODUCT, normal_url=_missing(t), store=t.store, device="cpu"),
        ConfigError,
        "normal images folder not found",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_parameters_fail_before_any_work(trained: Trained, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    call, error, message = BAD_CALLS[case]
    listed: list[str] = []
    monkeypatch.setattr(padim_prefect.tasks.storage, "list_images", lambda url, *a, **k: listed.append(url) or [])
    store = trained.model_store
    versions_before = [v.version for v in store.versions(PRODUCT)]

    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")) as raised:
        call(trained)

    assert isinstance(raised.value, (PadimError, ValidationError))
    assert listed == []  # no image was even listed
    assert [v.version for v in store.versions(PRODUCT)] == versions_before
    assert set(store.products()) == {PRODUCT}
    assert query_reports(trained.store, since="2026-12-01", until="2026-12-01").empty


# ---- retrain ----------------------------------------------------------------------------------------


def test_retrain_adds_new_images_exactly_like_a_fit_from_scratch(
    prefect_harness: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = record_events(monkeypatch)
    store = str(tmp_path / "store")
    folder_a = local_dir(tmp_path / "a")
    folder_b = local_dir(tmp_path / "b")
    write_images(folder_a, 12, seed=11)
    new_b = write_images(folder_b, 4, seed=12, prefix="new")
    duplicate = os.path.join(folder_b, "copy-of-a.png")  # same content as an image already fitted
    # batch_size=1: a float32 convolution's result can depend on the batch it is in; one image per
    # batch makes every image's embedding the same bits in every fit, so only the statistics differ.
    first = train(product="line", normal_url=folder_a, store=store, batch_size=1, **train_kwargs())
    fitted_a = read_training_images(first["url"])["fit"]
    shutil.copyfile(fitted_a[0][0], duplicate)

    result = retrain(product="line", normal_url=folder_b, store=store, device="cpu", batch_size=1, shard_size=2)

    assert result["status"] == "published" and result["previous_version"] == first["version"]
    model_store = ModelStore(store)
    assert model_store.latest("line") == result["version"]
    assert len(model_store.versions("line")) == 2
    images = read_training_images(model_store.version_url("line", result["version"]))
    fit_uris = [u for u, _ in images["fit"]]
    assert fit_uris == [u for u, _ in fitted_a] + new_b  # the duplicate is recognised by content
    assert images["calibration"] == read_training_images(first["url"])["calibration"]
    assert result["n_train"] == len(fit_uris) == first["n_train"] + len(new_b)

    config = PadimConfig(**{k: v for k, v in CHEAP_MODEL.items() if k != "device"})
    scratch = fit_images(fit_uris, config, batch_size=1, device="cpu")
    assert not scratch.failed
    incremental = read_statistics(model_store.version_url("line", result["version"]))
    from_scratch = {k: v.cpu() for k, v in scratch.accumulator.state_dict().items()}
    assert int(incremental["n"]) == int(from_scratch["n"]) == len(fit_uris)
    diff = max_abs_difference(incremental, from_scratch)
    assert diff["mean"] <= 1e-9 and diff["m2"] <= 1e-9, diff
    assert [e["payload"]["reason"] for e in events_named(events, MODEL_PUBLISHED)] == ["train", "manual"]

    again = retrain(product="line", normal_url=folder_b, store=store, device="cpu")

    assert again["status"] == "unchanged" and again["version"] == result["version"]
    assert len(model_store.versions("line")) == 2
    assert len(events_named(events, MODEL_PUBLISHED)) == 2

    # A full refit of 16 images recalibrates on a fresh split: the promotion gate would keep it a
    # candidate (tests/test_promotion.py); gate=False puts it in use directly.
    full = retrain(
        product="line", normal_url=folder_b, store=store, device="cpu", full=True, reason="refit", gate=False
    )

    assert full["status"] == "published" and full["full"]
    assert model_store.latest("line") == full["version"] and len(model_store.versions("line")) == 3
    refit = read_training_images(model_store.version_url("line", full["version"]))
    assert {u for u, _ in refit["fit"] + refit["calibration"]} >= set(fit_uris)
    assert events_named(events, MODEL_PUBLISHED)[-1]["payload"]["reason"] == "refit"


# ---- watch --------------------------------------------------------------------------------------------


def test_watch_announces_each_new_batch_once(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    events = record_events(monkeypatch)
    landing = local_dir(trained.root / "landing")
    write_images(os.path.join(landing, "2026-11-20"), 2, seed=21, prefix="b1")
    write_images(os.path.join(landing, "2026-11-21"), 3, seed=22, prefix="b2")
    local_dir(Path(landing) / "empty-batch")
    update_product_settings(trained.model_store, PRODUCT, landing_url=landing)

    first = watch(store=trained.store, settle_seconds=0)

    assert [(a["product"], a["batch"], a["n_images"]) for a in first] == [
        (PRODUCT, "2026-11-20", 2),
        (PRODUCT, "2026-11-21", 3),
    ]
    added = events_named(events, NORMAL_IMAGES_ADDED)
    assert [e["payload"]["batch"] for e in added] == ["2026-11-20", "2026-11-21"]
    assert all(e["resource"]["padim.product"] == PRODUCT for e in added)
    assert [e["payload"]["batch_url"] for e in added] == [os.path.join(landing, a["batch"]) for a in first]
    for batch in list_batches(landing):
        assert os.path.isfile(marker_url(trained.model_store, PRODUCT, batch))

    second = watch(store=trained.store, product=PRODUCT, settle_seconds=0)

    assert second == []
    assert len(events_named(events, NORMAL_IMAGES_ADDED)) == 2

    write_images(os.path.join(landing, "2026-11-22"), 2, seed=23, prefix="b3")
    unsettled = watch(store=trained.store, product=PRODUCT, settle_seconds=3600)
    third = watch(store=trained.store, product=PRODUCT, settle_seconds=0)

    assert unsettled == []  # a batch still being written is not announced early
    assert [a["batch"] for a in third] == ["2026-11-22"]
    assert len(events_named(events, NORMAL_IMAGES_ADDED)) == 3


# ---- nightly ------------------------------------------------------------------------------------------


def test_nightly_scores_every_product_and_one_failure_does_not_stop_the_others(
    trained: Trained, tmp_path: Path
) -> None:
    store = ModelStore(str(tmp_path / "store"))
    for product in ("line-a", "line-b"):
        clone_product(trained.model_store, PRODUCT, store, product)
        update_product_settings(store, product, incoming_url=str(tmp_path / "incoming" / product / "{date}"))
    write_images(str(tmp_path / "incoming" / "line-a" / "2026-11-24"), 3, seed=31, prefix="a")
    write_images(str(tmp_path / "incoming" / "line-b" / "2026-11-24"), 2, seed=32, prefix="b")

    both = nightly(store=store.root, date="2026-11-24", device="cpu")

    assert set(both["products"]) == {"line-a", "line-b"}
    assert both["products"]["line-a"]["n_scored"] == 3 and both["products"]["line-b"]["n_scored"] == 2
    assert len(rows_of(store.root, "line-a", "2026-11-24")) == 3
    assert len(rows_of(store.root, "line-b", "2026-11-24")) == 2

    # the next night only line-a's images arrived: line-b's night is a warning, not a failure
    write_images(str(tmp_path / "incoming" / "line-a" / "2026-11-25"), 4, seed=33, prefix="a")
    second = nightly(store=store.root, date="2026-11-25", device="cpu")

    assert second["products"]["line-b"]["nothing_arrived"]
    assert len(rows_of(store.root, "line-a", "2026-11-25")) == 4
    assert rows_of(store.root, "line-b", "2026-11-25").empty

    # line-b's incoming folder is gone: line-b fails (tests/test_operations.py), line-a is still scored
    shutil.rmtree(tmp_path / "incoming" / "line-b")
    write_images(str(tmp_path / "incoming" / "line-a" / "2026-11-26"), 2, seed=34, prefix="a")
    with pytest.raises(PadimError, match="line-b"):
        nightly(store=store.root, date="2026-11-26", device="cpu")

    assert len(rows_of(store.root, "line-a", "2026-11-26")) == 2


# ---- Dask ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dask_local_cluster_publishes_the_same_statistics_as_threads(
    prefect_harness: None,
    tmp_path: Path,
) -> None:
    pytest.importorskip("prefect_dask")
    # The default backbone (real offline weights): its depthwise convolutions round differently
    # with another intra-op thread count, which the runner must rule out.
    options = {"backbone": "efficientnet_lite0", "image_size": 64, "crop_size": 56, "channels": 16, "device": "cpu"}
    normal = local_dir(tmp_path / "normal")
    write_images(normal, 18, seed=41)  # 10 held out, 8 fitted in 2 shards
    store = str(tmp_path / "store")
    kwargs = {"normal_url": normal, "store": store, "shard_size": SHARD_SIZE, **options}

    threads = with_task_runner(train, "threads", workers=2)(product="threads", **kwargs)
    state = with_task_runner(train, "dask", workers=2)(product="dask", return_state=True, **kwargs)
    dask = state.result()

    assert task_run_names(state.state_details.flow_run_id).count("fit_shard_task") == 2  # 8 images, 4 per shard
    model_store = ModelStore(store)
    a = read_statistics(model_store.version_url("threads", threads["version"]))
    b = read_statistics(model_store.version_url("dask", dask["version"]))
    assert int(a["n"]) == int(b["n"]) == threads["n_train"] == dask["n_train"]
    diff = max_abs_difference(a, b)
    assert diff["mean"] <= 1e-9 and diff["m2"] <= 1e-9, diff
    assert read_training_images(dask["url"]) == read_training_images(threads["url"])
