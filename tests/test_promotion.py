"""The promotion gate of retrained models, candidates, the calibration pool and retention.

Unit tests of the store (candidates, promote, prune), the pool and the gate's decision run
without Prefect; the flow tests run retrains through the Prefect test harness with the cheap
random-weights model of ``tests/flow_helpers.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from padim.errors import ConfigError, ModelNotFoundError
from padim.io.fsio import join_url, read_bytes, url_to_fs
from padim.io.manifest import write_manifest
from padim.io.store import ModelStore
from padim.io.store_layout import CANDIDATES_FILE
from padim.jobs.calibration_pool import grow_pool, pool_url, read_pool
from padim.jobs.promotion import decide
from padim.settings import GateSettings, RetentionSettings
from tests.flow_helpers import (
    CHEAP_MODEL,
    events_named,
    flow_run_warnings,
    local_dir,
    png_bytes,
    record_events,
    texture,
    write_images,
)
from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401

pytest_plugins = ["tests.prefect_harness"]

# ---- the decision ---------------------------------------------------------------------------------


def test_a_threshold_that_jumps_is_rejected_with_the_bound_named() -> None:
    decision = decide(641.0, 509.0, 0.01, [400.0] * 20, [], GateSettings())
    assert not decision.passed
    assert len(decision.reasons) == 1 and "max_threshold_change" in decision.reasons[0]
    assert math.isclose(decision.threshold_change, 132 / 509)


def test_a_threshold_within_the_bound_with_few_false_alarms_passes() -> None:
    decision = decide(520.0, 509.0, 0.01, [400.0] * 19 + [530.0], [], GateSettings())
    assert decision.passed, decision.reasons
    assert decision.pool_false_alarms == 1 and decision.pool_images == 20  # 5 % <= 1 % + 5 %


def test_too_many_false_alarms_on_the_pool_are_rejected() -> None:
    decision = decide(500.0, 509.0, 0.01, [400.0] * 17 + [600.0] * 3, [], GateSettings())
    assert not decision.passed
    assert "3 of 20 normal images" in decision.reasons[0] and "fpr_tolerance" in decision.reasons[0]


def test_the_false_alarm_bound_allows_for_what_a_small_calibration_can_resolve() -> None:
    """A 1 % threshold set on 10 images is their largest score: ~1 in 11 unseen good images lie above."""
    two, three = [400.0] * 18 + [600.0] * 2, [400.0] * 17 + [600.0] * 3  # 10 % and 15 % of the pool flagged
    small = decide(500.0, 509.0, 0.01, two, [], GateSettings(), calibrated_on=10)
    assert small.passed, small.reasons
    assert math.isclose(small.max_pool_fpr, 1 / 11 + 0.05)
    large = decide(500.0, 509.0, 0.01, two, [], GateSettings(), calibrated_on=1000)
    assert not large.passed and math.isclose(large.max_pool_fpr, 0.06)
    assert "the target 1.0%" in large.reasons[0]
    too_many = decide(500.0, 509.0, 0.01, three, [], GateSettings(), calibrated_on=10)
    assert not too_many.passed and "set on 10 images" in too_many.reasons[0]


def test_a_small_pool_is_not_judged_but_said_so() -> None:
    decision = decide(500.0, 509.0, 0.01, [600.0] * 3, [], GateSettings(min_pool_images=10))
    assert decision.passed and "min_pool_images" in decision.notes[0]


def test_missing_a_reference_defect_the_version_in_use_flags_is_rejected() -> None:
    defects = [("a.png", 700.0, 700.0), ("b.png", 600.0, 520.0), ("c.png", 100.0, 100.0)]
    decision = decide(530.0, 509.0, 0.01, [400.0] * 20, defects, GateSettings())
    assert not decision.passed
    assert decision.defects_flagged_in_use == 2 and decision.defects_missed == ["b.png"]
    assert "misses 1 of the 2 reference defects" in decision.reasons[0]


def test_a_degenerate_threshold_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="in-use image threshold"):
        decide(500.0, 0.0, 0.01, [], [], GateSettings())


# ---- the false-alarm check out of sample ------------------------------------------------------------

GATE_CONFIG: dict[str, Any] = {
    "backbone": "resnet18",
    "weights": "random",
    "image_size": 64,
    "crop_size": 56,
    "channels": 16,
}
"""The cheap model of the flow tests (random weights, small images), for models fitted by hand."""


def fit_model(uris: list[str], threshold: float = 1.0, **options: Any) -> Any:
    """A model fitted on ``uris`` through the engine, with its statistics and training images."""
    from padim.core.config import PadimConfig
    from padim.core.fitter import build_model
    from padim.core.model import Thresholds, TrainingInfo
    from padim.jobs.engine import fit_images

    config = PadimConfig(**{**GATE_CONFIG, **options})
    fit = fit_images(uris, config, batch_size=1, device="cpu")
    images = [(r.uri, r.sha256 or "") for r in fit.fitted]
    assert len(images) == len(uris)
    return build_model(
        config,
        fit.accumulator,
        weights_sha256=fit.weights_sha256,
        training=TrainingInfo(n_train=len(images), training_set_sha256="", training_images=images),
        thresholds=Thresholds(image=threshold, pixel=threshold, image_fpr=0.01, pixel_fpr=0.01, n_images=10),
    )


def scores_of(model: Any, uris: list[str]) -> dict[str, float]:
    """Image scores through the engine, one image per batch."""
    from padim.jobs.engine import score_images

    return {s.record.uri: float(s.score) for s in score_images(model, uris, batch_size=1, keep_maps="none")}


def pool_of(model: Any, uris: list[str]) -> list[Any]:
    """Pool entries of training images of ``model``, with their recorded sha256."""
    from padim.jobs.calibration_pool import PoolImage

    sha = dict(model.training.training_images)
    return [PoolImage(uri, sha[uri]) for uri in uris]


def write_outliers(folder: str, n: int, seed: int) -> list[str]:
    """Good-looking images of another kind (the colours of the texture inverted)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = Path(folder, f"outlier-{i:03d}.png")
        path.write_bytes(png_bytes(255 - texture(rng)))
        paths.append(str(path))
    return paths


def test_pool_batches_are_scored_like_a_fit_without_them(tmp_path: Path) -> None:
    from padim.jobs.calibration_pool import PoolImage, score_pool

    images = write_images(local_dir(tmp_path / "good"), 16, seed=51)
    unseen = write_images(local_dir(tmp_path / "unseen"), 1, seed=52, prefix="unseen")
    candidate = fit_model(images)
    batches = {"v1": images[1:7:2], "v2": images[8:16:2]}  # held out for two versions: 3 and 4 of the 16
    sha = dict(candidate.training.training_images)
    pool = [PoolImage(u, sha[u], version) for version, uris in batches.items() for u in uris]
    pool.append(PoolImage(unseen[0], ""))  # a pool image not in its statistics

    scored = score_pool(candidate, pool, batch_size=1)

    removed = [u for uris in batches.values() for u in uris]
    assert scored.fallback == "" and scored.skipped == 0
    assert scored.in_statistics == removed and sorted(scored.left_out) == sorted(removed)
    for uris in batches.values():  # each batch: the scores of a fit on the other 16 - len(batch) images
        from_scratch = scores_of(fit_model([u for u in images if u not in uris]), uris)
        for uri in uris:
            assert math.isclose(scored.scores[uri], from_scratch[uri], rel_tol=1e-4), (uri, scored.scores[uri])
    assert np.mean([scored.scores[u] for u in removed]) > np.mean([scored.in_sample[u] for u in removed])
    assert scored.scores[unseen[0]] == scored.in_sample[unseen[0]] == scores_of(candidate, unseen)[unseen[0]]
    assert candidate.accumulator.n == 16  # the candidate's own statistics are untouched


def test_outliers_explained_in_sample_are_false_alarms_out_of_sample(tmp_path: Path) -> None:
    from padim.jobs.calibration_pool import score_pool
    from padim.jobs.promotion import check_candidate, describe

    good = write_images(local_dir(tmp_path / "good"), 16, seed=61)
    outliers = write_outliers(local_dir(tmp_path / "outliers"), 10, seed=62)
    candidate = fit_model(good + outliers)
    pool = pool_of(candidate, outliers)
    # A threshold above every in-sample pool score: the in-sample check would count no false alarm.
    candidate.thresholds.image = 1.1 * max(score_pool(candidate, pool, batch_size=1).in_sample.values())

    decision = check_candidate(candidate, candidate, pool, [], GateSettings(), batch_size=1)

    assert decision.pool_false_alarms_in_sample == 0
    assert decision.pool_left_out == decision.pool_images == 10 and decision.pool_in_sample == 0
    assert decision.pool_false_alarms > 0 and not decision.passed
    assert "normal images of the calibration pool" in decision.reasons[0], decision.reasons
    assert decision.pool_fallback == "" and not decision.notes
    assert f"{decision.pool_false_alarms}/10 pool false alarms (out of sample; 0 in sample)" in describe(decision)


@pytest.mark.parametrize(
    ("n_images", "options", "why"),
    [(8, {"augment_copies": 1}, "augment_copies"), (5, {}, "fewer than 2")],
    ids=["augmentation", "too-few-left"],
)
def test_the_check_falls_back_to_in_sample_scores_and_says_so(
    tmp_path: Path, n_images: int, options: dict[str, Any], why: str
) -> None:
    from padim.jobs.calibration_pool import score_pool
    from padim.jobs.promotion import check_candidate, describe

    images = write_images(local_dir(tmp_path / "good"), n_images, seed=71)
    candidate = fit_model(images, **options)
    pool = pool_of(candidate, images[:4])

    scored = score_pool(candidate, pool, batch_size=1)
    assert why in scored.fallback and scored.left_out == []
    assert scored.scores == scored.in_sample == scores_of(candidate, images[:4])

    decision = check_candidate(candidate, candidate, pool, [], GateSettings(min_pool_images=4), batch_size=1)
    assert why in decision.pool_fallback and decision.pool_in_sample == 4 and decision.pool_left_out == 0
    assert any("counted in sample" in n and "undercount" in n and why in n for n in decision.notes), decision.notes
    assert "pool false alarms (4 in sample)" in describe(decision)


# ---- the store: candidates, promote, prune ----------------------------------------------------------


def writer(tag: bytes) -> Callable[[str], None]:
    """A publish callback writing one small file and the manifest."""

    def write(url: str) -> None:
        with fsspec.open(join_url(url, "model.bin"), "wb") as handle:
            handle.write(tag)
        write_manifest(url, {"backbone": "test"})

    return write


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ModelStore:
    """A fresh store on local disk or on a fresh S3 bucket."""
    if request.param == "local":
        return ModelStore(str(tmp_path / "store"))
    return ModelStore(f"{request.getfixturevalue('s3_bucket')}/padim")


def test_a_candidate_is_listed_and_not_used_until_promoted(store: ModelStore) -> None:
    first = store.publish("bottle", writer(b"1"))
    candidate = store.publish("bottle", writer(b"2"), promote=False, reason="threshold jumped")

    assert store.latest("bottle") == first
    listed = {v.version: v for v in store.versions("bottle")}
    assert listed[candidate].is_candidate and not listed[candidate].is_latest
    assert listed[candidate].candidate["reason"] == "threshold jumped"
    assert not listed[first].is_candidate
    raw = json.loads(read_bytes(join_url(store.models_url("bottle"), CANDIDATES_FILE)))
    assert list(raw["candidates"]) == [candidate]

    assert store.promote("bottle", candidate) == first
    assert store.latest("bottle") == candidate and store.candidates("bottle") == {}
    with pytest.raises(ConfigError, match="in use"):
        store.mark_candidate("bottle", candidate, "no")
    with pytest.raises(ModelNotFoundError):
        store.promote("bottle", "v20000101T000000Z-000000")


def test_prune_keeps_the_newest_the_version_in_use_and_candidates(store: ModelStore) -> None:
    oldest, second, third = (store.publish("bottle", writer(bytes([i]))) for i in range(3))
    candidate = store.publish("bottle", writer(b"c"), promote=False)
    fourth, newest = (store.publish("bottle", writer(bytes([i]))) for i in range(4, 6))
    store.set_latest("bottle", oldest)  # rolled back to the oldest

    removed = store.prune("bottle", keep=1)

    assert {v.version for v in store.versions("bottle")} == {newest, oldest, candidate}
    assert removed == [fourth, third, second]
    fs, models = url_to_fs(store.models_url("bottle"))
    fs.invalidate_cache()
    left = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(models))
    assert left == sorted(["LATEST", CANDIDATES_FILE, newest, oldest, candidate]), left  # no leftovers
    assert store.prune("bottle", keep=1) == []
    with pytest.raises(ValueError, match="keep must be at least 1"):
        store.prune("bottle", keep=0)


# ---- the calibration pool -------------------------------------------------------------------------


def test_the_pool_grows_without_duplicates(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path / "store"))
    assert read_pool(store, "bottle") == []
    grow_pool(store, "bottle", [("a.png", "1"), ("b.png", "2")], "v1")
    pool = grow_pool(store, "bottle", [("b.png", "2"), ("c.png", "3"), ("a.png", "9")], "v2")
    assert [(p.uri, p.sha256, p.version) for p in pool] == [
        ("a.png", "1", "v1"),
        ("b.png", "2", "v1"),
        ("c.png", "3", "v2"),
        ("a.png", "9", "v2"),  # the same name with other content is another image
    ]
    assert read_pool(store, "bottle") == pool
    assert json.loads(Path(pool_url(store, "bottle")).read_text())["images"][2]["uri"] == "c.png"


# ---- the retrain flow through the gate ---------------------------------------------------------------


def write_noisy(folder: str, n: int, seed: int, noise: float) -> None:
    """Normal textures with extra pixel noise (a batch whose calibration moves the threshold)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = texture(rng).astype(np.float64) + rng.normal(0.0, noise, (80, 80, 3))
        Path(folder, f"noisy-{i:03d}.png").write_bytes(png_bytes(np.clip(pixels, 0, 255).astype(np.uint8)))


def retrain_cpu(**kwargs: Any) -> dict[str, Any]:
    """Run the retrain flow on the CPU with a batch size that keeps embeddings bitwise stable."""
    from padim_prefect.flows.retrain import retrain

    return retrain(device="cpu", batch_size=1, **kwargs)


def test_retrains_pass_or_stay_candidates_and_a_person_can_promote(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from padim_prefect.flows.train import train
    from padim_prefect.tasks.events import MODEL_PUBLISHED, MODEL_REJECTED

    from padim.jobs.products import update_product_settings
    from padim_cli.main import main

    events = record_events(monkeypatch)
    root = str(tmp_path / "store")
    store = ModelStore(root)
    first = train(product="line", normal_url=write_dir(tmp_path / "a", 20, 31), store=root, batch_size=1, **CHEAP_MODEL)
    pool_after_train = read_pool(store, "line")
    assert len(pool_after_train) == first["n_calibration"] == 10

    # A batch of the same kind of images: the threshold stays put (8 % here), the candidate is promoted.
    defects = local_dir(tmp_path / "defects")
    write_images(defects, 0, n_defect=3, seed=30)
    # The pool's false alarms are counted out of sample: with 10 held-out images per batch a
    # threshold at a 1 % target is the largest of 10 scores, so about 1 in 11 unseen good images
    # lies above it; the gate's bound allows for that (max(1 %, 1 / 11) + the default 5 %).
    update_product_settings(store, "line", reference_defects_url=defects)
    good = retrain_cpu(product="line", normal_url=write_dir(tmp_path / "b", 12, 32), store=root)
    assert good["status"] == "published" and good["gate"]["passed"], good["gate"]
    assert good["gate"]["defects"] == 3 and good["gate"]["defects_missed"] == []
    # Every pool image is in the candidate's statistics: all are scored by the leave-pool-out model.
    assert good["gate"]["pool_left_out"] == good["gate"]["pool_images"] == 20 and good["gate"]["pool_fallback"] == ""
    assert store.latest("line") == good["version"] and store.candidates("line") == {}
    assert len(read_pool(store, "line")) == 20  # the new batch's 10 held-out images joined the pool
    assert events_named(events, MODEL_PUBLISHED)[-1]["payload"]["version"] == good["version"]

    # A batch with far more pixel noise: its calibration jumps, the candidate stays a candidate.
    noisy = local_dir(tmp_path / "c")
    write_noisy(noisy, 12, 33, noise=40.0)
    update_product_settings(store, "line", max_threshold_change=0.3)  # a per-product bound
    with flow_run_warnings() as warnings:
        bad = retrain_cpu(product="line", normal_url=noisy, store=root)
    logged = [w for w in warnings if bad["version"] in w and "stays a candidate" in w]
    assert len(logged) == 1 and "the image threshold moved by" in logged[0], warnings
    assert f"padim models promote line {bad['version']}" in logged[0]
    assert bad["status"] == "candidate" and not bad["gate"]["passed"]
    assert any("the bound is 30.0% (max_threshold_change)" in r for r in bad["gate"]["reasons"]), bad["gate"]
    assert store.latest("line") == good["version"] == bad["in_use"]
    reason = store.candidates("line")[bad["version"]]["reason"]
    assert reason.startswith("rejected: the image threshold moved by")
    rejected = events_named(events, MODEL_REJECTED)
    assert [e["payload"]["version"] for e in rejected] == [bad["version"]]
    assert rejected[0]["payload"]["in_use"] == good["version"] and rejected[0]["payload"]["reasons"]
    assert events_named(events, MODEL_PUBLISHED)[-1]["payload"]["version"] == good["version"]
    assert len(read_pool(store, "line")) == 30  # the pool grows whatever the gate decides
    card = model_card("model-line")
    assert (
        f"# Model line {bad['version']}" in card and f"Promotion gate rejected: {good['version']} stays in use" in card
    )
    assert "pool false alarms (out of sample;" in card

    cli(main, "models", "--product", "line", "--store", root)
    listing = capsys.readouterr().out
    assert f"c {bad['version']}: rejected:" in listing
    assert next(line for line in listing.splitlines() if bad["version"] in line).startswith("c ")
    assert next(line for line in listing.splitlines() if good["version"] in line).startswith("* ")

    cli(main, "models", "promote", "line", bad["version"], "--store", root)
    assert f"version {bad['version']} is in use (was {good['version']})" in capsys.readouterr().out
    assert store.latest("line") == bad["version"] and store.candidates("line") == {}

    cli(main, "models", "prune", "line", "--keep", "1", "--store", root)
    assert "removed 2 version(s)" in capsys.readouterr().out
    assert [v.version for v in store.versions("line")] == [bad["version"]]


def test_retention_after_publish_and_the_gate_switched_off(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from padim_prefect.flows.train import train

    from padim.jobs.products import update_product_settings

    root = str(tmp_path / "store")
    store = ModelStore(root)
    normal = write_dir(tmp_path / "a", 14, 41)
    train(product="keep", normal_url=normal, store=root, batch_size=1, **CHEAP_MODEL)
    update_product_settings(store, "keep", keep_versions=2)
    noisy = local_dir(tmp_path / "n")
    write_noisy(noisy, 12, 42, noise=40.0)
    candidate = retrain_cpu(product="keep", normal_url=noisy, store=root, max_threshold_change=1e-6)
    assert candidate["status"] == "candidate"
    latest = [train(product="keep", normal_url=normal, store=root, batch_size=1, **CHEAP_MODEL) for _ in range(2)]
    versions = {v.version for v in store.versions("keep")}
    assert versions == {latest[-1]["version"], latest[0]["version"], candidate["version"]}  # candidate kept
    more = local_dir(tmp_path / "m")
    write_noisy(more, 12, 43, noise=40.0)
    direct = retrain_cpu(product="keep", normal_url=more, store=root, gate=False)
    assert direct["status"] == "published" and direct["gate"] is None
    assert store.latest("keep") == direct["version"]


def model_card(key: str) -> str:
    """The newest markdown artifact with a key (the model card of the last publish)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC
        )
    return str(artifacts[0].data)


def cli(main: Callable[[list[str]], None], *args: str) -> None:
    """Run the command line in-process; it must succeed."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    assert exited.value.code in (0, None)


def write_dir(path: Path, n: int, seed: int) -> str:
    """A folder of ``n`` normal textures."""
    folder = local_dir(path)
    write_images(folder, n, seed=seed)
    return folder


def test_configure_sets_the_gate_retention_and_drift_of_one_product(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from padim.jobs.products import read_product_settings
    from padim_cli.main import main

    root = str(tmp_path / "store")
    defects = local_dir(tmp_path / "defects")
    cli(
        main,
        *("configure", "--product", "bottle", "--store", root, "--reference-defects", defects),
        *("--max-threshold-change", "0.3", "--fpr-tolerance", "0.02", "--keep-versions", "4"),
        *("--drift-min-images", "5", "--drift-max-anomaly-rate", "0.2", "--drift-max-median-ratio", "1.2"),
    )
    assert "reference_defects_url" in capsys.readouterr().out
    settings = read_product_settings(ModelStore(root), "bottle")
    assert settings.reference_defects_url == defects
    assert settings.gate() == GateSettings(max_threshold_change=0.3, fpr_tolerance=0.02)
    assert settings.gate(max_threshold_change=0.5).max_threshold_change == 0.5  # a run's own bound wins
    assert settings.keep() == 4 and settings.keep(0) is None
    assert settings.drift() == {"drift_min_images": 5, "drift_max_anomaly_rate": 0.2, "drift_max_median_ratio": 1.2}
    assert read_product_settings(ModelStore(root), "other").keep() == RetentionSettings().keep_versions
