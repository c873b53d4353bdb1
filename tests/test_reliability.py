"""Fault suite, part 1: bad inputs, unusable models, tampering, NaN, hostile names, security.

Every test drives the real flows (one Prefect test server per session) with a cheap model and
asserts the outcome: which report rows exist and what they say, which error is raised, and that
nothing was published, listed or written when the run had to stop. ``docs/reliability.md`` maps
each fault to its test. Storage faults, killed and concurrent runs are in
``tests/test_reliability_faults.py``.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import padim_prefect.tasks.events
import padim_prefect.tasks.promotion
import padim_prefect.tasks.scoring
import padim_prefect.tasks.storage
import padim_prefect.tasks.training
import pytest
import torch
from padim_prefect.flows.retrain import retrain
from padim_prefect.flows.score import score
from padim_prefect.flows.train import train

from padim.errors import (
    IncompatibleModelError,
    InvalidProductNameError,
    ModelIntegrityError,
    ModelNotFoundError,
    PadimError,
    StoreError,
)
from padim.io.artifact import MANIFEST, MODEL_FILE, TRAINING_FILE, load_model
from padim.io.loading import ImageRecord
from padim.io.store import ModelStore
from padim.io.store_layout import LATEST_POINTER
from padim.jobs.engine import summarise_batch
from padim.jobs.inspection import cached_model, heatmap_url
from padim.jobs.training import plan_training
from padim.reports import list_report_files, make_ok_row, query_reports, scored_images, write_report_rows
from padim.settings import ScoreSettings, TrainSettings
from tests.reliability_support import (
    BAD_FILES,
    CHEAP_MODEL,
    DAY,
    ODD_VALID_FILES,
    PRODUCT,
    TrainedStore,
    deny_reads,
    files_under,
    iter_python_sources,
    local_dir,
    raw_report_rows,
    record_listing,
    remove_after_listing,
    trained_store,
    write_bad_files,
    write_defective,
    write_images,
    write_odd_valid_files,
)

pytest_plugins = ["tests.prefect_harness"]

SOURCE_PACKAGES = ("padim", "tasks", "flows", "padim_cli", "deployments")
HOSTILE_PRODUCTS = ("../x", "a/b", "..", "x/../../y", "/abs", "a\\b")


@pytest.fixture(scope="module")
def trained(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    """The session's trained store (a Prefect test server is up for the module)."""
    return trained_store(tmp_path_factory)


def score_folder(store: str, folder: str, **options: Any) -> dict[str, Any]:
    """Run the score flow on a folder with the suite's defaults."""
    return score(product=PRODUCT, images_url=folder, store=store, date=DAY, device="cpu", **options)


def assert_nothing_published(store: str, product: str) -> None:
    """No complete version, no ``LATEST`` and no leftover of a version for ``product``."""
    model_store = ModelStore(store)
    assert model_store.versions(product) == []
    with pytest.raises(ModelNotFoundError):
        model_store.latest(product)
    models = Path(store) / product / "models"
    assert not (models / LATEST_POINTER).exists()
    assert not models.exists() or list(models.iterdir()) == [], list(models.iterdir())
    work = Path(store) / product / "work"
    assert not work.exists() or list(work.iterdir()) == [], "partial statistics were left behind"


# ---- bad images ---------------------------------------------------------------------------------------


def test_every_bad_image_becomes_an_error_row_and_odd_valid_images_are_scored(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    night = tmp_path / "night"
    good = write_images(str(night), 3, seed=2, prefix="good")
    bad = write_bad_files(night)
    odd = write_odd_valid_files(night)
    denied = deny_reads(monkeypatch)
    remove_after_listing(monkeypatch)
    store = trained.copy_to(tmp_path / "store")

    result = score_folder(store, str(night), shard_size=4)

    rows = query_reports(store, product=PRODUCT)
    assert len(rows) == len(good) + len(bad) + len(odd) == 3 + len(BAD_FILES) + len(ODD_VALID_FILES)
    assert len(raw_report_rows(store)) == len(rows)  # one row per file, also physically
    by_name = {os.path.basename(row["image_uri"]): row for row in rows.to_dict("records")}
    for name, reason in BAD_FILES.items():
        row = by_name[name]
        assert row["status"] == "error", (name, row)
        assert reason in row["error"].lower(), (name, row["error"])
        assert row["score"] is None or math.isnan(row["score"])
    for name in [os.path.basename(p) for p in good] + list(ODD_VALID_FILES):
        row = by_name[name]
        assert row["status"] == "ok", (name, row["error"])
        assert math.isfinite(row["score"]) and row["width"] > 0 and row["height"] > 0
    assert result["n_images"] == len(rows)
    assert result["n_errors"] == len(BAD_FILES)
    assert result["n_scored"] == len(good) + len(ODD_VALID_FILES)
    assert denied, "the permission error was not exercised"
    # A second run retries only the unreadable files: still one row per file.
    second = score_folder(store, str(night), shard_size=4)
    assert second["n_skipped"] == len(good) + len(ODD_VALID_FILES)
    assert len(query_reports(store, product=PRODUCT)) == len(rows)


# ---- training on unusable folders ---------------------------------------------------------------------


def _empty(folder: Path) -> None:
    folder.mkdir(parents=True)


def _not_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("line 3 stopped at 02:00\n")
    (folder / "labels.csv").write_text("file,label\n")


def _only_bad(folder: Path) -> None:
    # Two sets of every bad kind: enough files to pass the hold-out planning (12 or more).
    write_bad_files(folder / "line-a")
    write_bad_files(folder / "line-b", seed=8)


NO_USABLE_IMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty folder": (_empty, "no images found to train on"),
    "only non-image files": (_not_images, "no images found to train on"),
    "only bad images": (_only_bad, "no usable training image"),
}


@pytest.mark.parametrize("case", list(NO_USABLE_IMAGE))
def test_training_without_a_usable_image_fails_clearly_and_publishes_nothing(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    make, message = NO_USABLE_IMAGE[case]
    folder = tmp_path / "normal"
    make(folder)
    deny_reads(monkeypatch)
    remove_after_listing(monkeypatch)
    store = str(tmp_path / "store")

    with pytest.raises(PadimError, match=message):
        train(product="fresh", normal_url=str(folder), store=store, shard_size=4, **CHEAP_MODEL)

    assert_nothing_published(store, "fresh")


TOO_FEW: dict[str, tuple[int, int, str]] = {
    "two images": (2, 0, "only 2 normal images: cannot hold out"),
    "six images": (6, 0, "only 6 normal images: cannot hold out"),
    "twelve images, one of the two to fit unreadable": (12, 1, r"only 1 usable training image\(s\): need at least 2"),
}


@pytest.mark.parametrize("case", list(TOO_FEW))
def test_training_on_too_few_images_fails_clearly_and_publishes_nothing(
    trained: TrainedStore, tmp_path: Path, case: str
) -> None:
    count, corrupt, message = TOO_FEW[case]
    normal = write_images(local_dir(tmp_path / "normal"), count, seed=3)
    if corrupt:
        fit = plan_training(normal, TrainSettings()).fit_shards[0]
        for path in fit[:corrupt]:
            Path(path).write_bytes(Path(path).read_bytes()[:50])
    store = str(tmp_path / "store")

    with pytest.raises(PadimError, match=message):
        train(product="fresh", normal_url=os.path.dirname(normal[0]), store=store, shard_size=4, **CHEAP_MODEL)

    assert_nothing_published(store, "fresh")


def test_the_smallest_trainable_set_gives_a_regularised_finite_model(trained: TrainedStore, tmp_path: Path) -> None:
    """Two fitted images (twelve listed, ten held out): the provisional model's covariance is the
    sample one + 0.01 I; the held-out images calibrate it, then join the statistics."""
    normal = tmp_path / "normal"
    write_images(local_dir(normal), 12, seed=4)
    store = str(tmp_path / "store")

    result = train(product="fresh", normal_url=str(normal), store=store, shard_size=4, **CHEAP_MODEL)

    assert result["n_train"] == 12 and result["n_calibration"] == 10
    assert math.isfinite(result["image_threshold"]) and result["image_threshold"] > 0
    assert math.isfinite(result["pixel_threshold"]) and result["pixel_threshold"] > 0
    model = load_model(result["url"], with_statistics=True)
    assert torch.isfinite(model.mean).all() and torch.isfinite(model.factor).all()
    assert model.accumulator is not None and model.accumulator.n == 12
    night = tmp_path / "night"
    write_images(str(night), 2, 1, seed=5)
    summary = score(product="fresh", images_url=str(night), store=store, date=DAY, device="cpu")
    rows = query_reports(store, product="fresh")
    assert summary["n_scored"] == 3 and len(rows) == 3
    assert (rows["status"] == "ok").all() and np.isfinite(rows["score"].astype(float)).all()


def test_normal_images_without_any_variation_are_refused(trained: TrainedStore, tmp_path: Path) -> None:
    """Twelve copies of one picture: the regularised covariance is finite, but every held-out image
    scores exactly 0, so no threshold can be calibrated; the model is not published."""
    normal = tmp_path / "normal"
    paths = write_images(local_dir(normal), 12, seed=4)
    for path in paths[1:]:
        shutil.copy(paths[0], path)
    store = str(tmp_path / "store")

    with pytest.raises(PadimError, match=r"image threshold of 0\.0: the normal images do not vary"):
        train(product="fresh", normal_url=str(normal), store=store, shard_size=4, **CHEAP_MODEL)

    assert_nothing_published(store, "fresh")


# ---- scoring with no model or a model this code cannot serve ------------------------------------------


def _republish(trained: TrainedStore, target: Path, change: Callable[[dict[str, Any]], None]) -> str:
    """Copy the store and publish, as the new latest, the trained version with an altered manifest.

    This is what a model published by another release (or for another backbone or input size)
    looks like: a complete, checksummed version whose description this code cannot serve.
    """
    store_root = trained.copy_to(target)
    store = ModelStore(store_root)
    source = Path(store.version_url(PRODUCT, trained.version))
    manifest = json.loads((source / MANIFEST).read_text())
    change(manifest)

    def write(url: str) -> None:
        for name in manifest["files"]:
            shutil.copy(source / name, Path(url) / name)
        (Path(url) / MANIFEST).write_text(json.dumps(manifest))

    store.publish(PRODUCT, write)
    return store_root


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        node = manifest
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value

    return change


def _both(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        for one in changes:
            one(manifest)

    return change


UNSERVABLE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "format of a newer release": (_set("format", "padim.model/99"), "model format"),
    "another backbone": (_both(_set("backbone", "vgg16"), _set("config.backbone", "vgg16")), "vgg16"),
    "other feature taps": (_set("taps", ["layer2", "layer3", "layer4"]), "taps"),
    "other image size": (_both(_set("config.image_size", 128), _set("config.crop_size", 112)), "do not match"),
    "other embedding size": (_set("config.channels", 32), "do not match"),
    "other backbone weights": (_set("weights_sha256", "0" * 64), "weights"),
    "no calibrated threshold": (_set("thresholds", None), "no calibrated threshold"),
}


@pytest.mark.parametrize("case", list(UNSERVABLE))
def test_a_model_this_code_cannot_serve_is_refused_before_any_work(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    change, message = UNSERVABLE[case]
    store = _republish(trained, tmp_path / "store", change)
    night = write_images(local_dir(tmp_path / "night"), 2, seed=6)
    listed = record_listing(monkeypatch)

    with pytest.raises(IncompatibleModelError, match=message):
        score_folder(store, os.path.dirname(night[0]))

    assert listed == []  # no image was listed, so none was read
    assert list_report_files(store) == []


MISSING_MODEL: dict[str, tuple[Callable[[Path], dict[str, Any]], type[Exception], str]] = {
    "product never trained": (lambda root: {"product": "gadget"}, ModelNotFoundError, "no model for product 'gadget'"),
    "version that does not exist": (
        lambda root: {"version": "v20990101T000000Z-000000"},
        ModelNotFoundError,
        "no complete version",
    ),
    "LATEST names an unfinished version": (
        lambda root: _point_latest_at_unfinished(root),
        ModelNotFoundError,
        "missing or incomplete",
    ),
    "corrupt LATEST pointer": (lambda root: _corrupt_latest(root), StoreError, "corrupt"),
}


def _corrupt_latest(root: Path) -> dict[str, Any]:
    """Overwrite ``LATEST`` with bytes that name no version."""
    (root / PRODUCT / "models" / LATEST_POINTER).write_text("{{{")
    return {}


def _point_latest_at_unfinished(root: Path) -> dict[str, Any]:
    """Leave a version folder without its ``_COMPLETE`` marker (a crash mid-publish) and point LATEST at it."""
    models = root / PRODUCT / "models"
    current = json.loads((models / LATEST_POINTER).read_text())["version"]
    unfinished = "v20990101T000000Z-dead00"
    shutil.copytree(models / current, models / unfinished)
    (models / unfinished / "_COMPLETE").unlink()
    (models / LATEST_POINTER).write_text(json.dumps({"version": unfinished}))
    return {}


@pytest.mark.parametrize("case", list(MISSING_MODEL))
def test_scoring_without_a_usable_model_fails_before_any_work(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    prepare, error, message = MISSING_MODEL[case]
    store = trained.copy_to(tmp_path / "store")
    options = {"product": PRODUCT, **prepare(Path(store))}
    night = write_images(local_dir(tmp_path / "night"), 2, seed=6)
    listed = record_listing(monkeypatch)

    with pytest.raises(error, match=message):
        score(images_url=os.path.dirname(night[0]), store=store, date=DAY, device="cpu", **options)

    assert listed == []
    assert list_report_files(store) == []


# ---- a model altered after publishing -------------------------------------------------------------------


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _raise_threshold(path: Path) -> None:
    manifest = json.loads(path.read_text())
    manifest["thresholds"]["image"] *= 100.0
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


TAMPERING: dict[str, tuple[str, Callable[[Path], None]]] = {
    "flipped byte in the tensors": (MODEL_FILE, _flip_byte),
    "truncated image list": (TRAINING_FILE, _truncate),
    "edited threshold in the manifest": (MANIFEST, _raise_threshold),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_a_model_file_altered_after_publishing_fails_with_a_checksum_error(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    name, tamper = TAMPERING[case]
    store = trained.copy_to(tmp_path / "store")
    model_store = ModelStore(store)
    tamper(Path(model_store.version_url(PRODUCT, trained.version)) / name)
    night = write_images(local_dir(tmp_path / "night"), 2, seed=6)
    listed = record_listing(monkeypatch)

    with pytest.raises(ModelIntegrityError, match=r"checksum|sha256|altered"):
        score_folder(store, os.path.dirname(night[0]))
    with pytest.raises(ModelIntegrityError):
        model_store.verify(PRODUCT, trained.version)

    assert listed == []
    assert list_report_files(store) == []


# ---- NaN and infinity never reach a report ---------------------------------------------------------------


NON_FINITE_MAPS = {"nan.png": float("nan"), "plus-inf.png": float("inf"), "minus-inf.png": float("-inf")}
"""Images whose anomaly map the test poisons with one NaN / +inf / -inf value."""


def test_non_finite_anomaly_maps_become_error_rows(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model produces NaN / +inf / -inf maps for three images: the guard makes them error rows."""
    import padim.jobs.engine

    night = tmp_path / "night"
    write_images(str(night), 3, seed=7, prefix="fine")
    poisoned = NON_FINITE_MAPS
    write_defective(night, list(poisoned))
    real = padim.jobs.engine.summarise_batch

    def poisoning(model: Any, records: Any, maps: torch.Tensor, keep_maps: str) -> Any:
        maps = maps.clone()
        for i, record in enumerate(records):
            value = poisoned.get(os.path.basename(record.uri))
            if value is not None:
                maps[i, 3, 5] = value
        return real(model, records, maps, keep_maps)

    monkeypatch.setattr(padim.jobs.engine, "summarise_batch", poisoning)
    store = trained.copy_to(tmp_path / "store")

    result = score_folder(store, str(night))

    rows = query_reports(store, product=PRODUCT).to_dict("records")
    assert len(rows) == 6 and result["n_errors"] == 3 and result["n_scored"] == 3
    for row in rows:
        if os.path.basename(row["image_uri"]) in poisoned:
            assert row["status"] == "error" and "non-finite" in row["error"], row
        else:
            assert row["status"] == "ok" and math.isfinite(row["score"]) and math.isfinite(row["normalized_score"])
    numbers = [r[c] for r in raw_report_rows(store) for c in ("score", "normalized_score", "threshold")]
    assert all(v is None or math.isfinite(v) for v in numbers)


def _ok_row(image_uri: str = "/x/0.png", run_id: str = "r1") -> dict[str, Any]:
    """A valid ok report row of :data:`PRODUCT`."""
    return make_ok_row(
        product=PRODUCT,
        date=DAY,
        run_id=run_id,
        image_uri=image_uri,
        image_sha256="ab" * 32,
        width=80,
        height=80,
        model_version="v1",
        backbone="resnet18",
        score=1.0,
        threshold=2.0,
        defect_area_fraction=0.0,
        max_x=1,
        max_y=1,
    )


def test_the_guard_and_the_writer_refuse_non_finite_values(trained: TrainedStore, tmp_path: Path) -> None:
    model = cached_model(ModelStore(trained.store).version_url(PRODUCT, trained.version), ScoreSettings(device="cpu"))
    side = model.config.input_size
    maps = torch.rand(5, side, side)
    maps[1, 0, 0], maps[2, 5, 5], maps[3, 7, 7] = float("nan"), float("inf"), float("-inf")
    maps[4] = 3e38  # finite everywhere, but its sum overflows: still a valid map
    records = [ImageRecord(uri=f"/x/{i}.png", sha256="ab" * 32, width=80, height=80) for i in range(5)]

    results = summarise_batch(model, records, maps, keep_maps="none")

    assert results[0].ok and math.isfinite(results[0].score or float("nan"))
    assert [r.ok for r in results[1:4]] == [False, False, False]
    assert all("non-finite" in (r.record.error or "") for r in results[1:4])
    assert results[4].ok and results[4].score == pytest.approx(3e38)
    # The report writer is the last line of defence (unit cases: test_reports.py).
    row = _ok_row()
    store = str(tmp_path / "store")
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_report_rows(store, [{**row, "score": float("nan"), "normalized_score": float("nan")}], run_id="r1")
    assert list_report_files(store) == []


# ---- hostile product names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE_PRODUCTS)
def test_a_path_like_product_name_is_rejected_by_every_flow_and_the_report_library(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    store = trained.copy_to(tmp_path / "work" / "store")
    before = files_under(tmp_path)
    listed = record_listing(monkeypatch)
    calls: list[Callable[[], Any]] = [
        lambda: train(product=name, normal_url=trained.normal, store=store, **CHEAP_MODEL),
        lambda: score(product=name, images_url=trained.normal, store=store, date=DAY, device="cpu"),
        lambda: retrain(product=name, normal_url=trained.normal, store=store, device="cpu"),
    ]
    for call in calls:
        with pytest.raises(InvalidProductNameError, match=r"invalid product name|product name is empty"):
            call()
    for query in (
        lambda: query_reports(store, product=name),
        lambda: scored_images(store, name, trained.version),
        lambda: ModelStore(store).artifact_url(name, "heatmaps"),
    ):
        with pytest.raises(ValueError, match="product name"):
            query()
    assert listed == []
    assert files_under(tmp_path) == before  # nothing written, inside or outside the store


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "name"), [("train", "a/b"), ("score", "a/b"), ("models", "a/b"), ("report", "../x"), ("report", "a/b")]
)
def test_the_command_line_rejects_a_path_like_product_name(tmp_path: Path, command: str, name: str) -> None:
    store = tmp_path / "store"
    (store / "reports").mkdir(parents=True)
    extra = {"train": ["--normal", str(tmp_path)], "score": ["--images", str(tmp_path)]}.get(command, [])
    env = {**os.environ, "PADIM_PROGRESS": "0", "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)

    done = subprocess.run(
        [sys.executable, "-m", "padim_cli.main", command, "--product", name, *extra, "--store", str(store)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"error: invalid product name {name!r}")
    assert files_under(store) == set()


# ---- security ------------------------------------------------------------------------------------------------

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    """``torch.load`` for an attribute chain, the name for a plain name, else ``""``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[str]:
    """Pickle use, unsafe deserialisation and dynamic code execution in a Python source.

    Args:
        source: Python source text.

    Returns:
        ``"line: what"`` for every finding.
    """
    findings = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in _PICKLE_MODULES:
                    findings.append(f"{node.lineno}: import {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        short = name.rsplit(".", 1)[-1]
        if name in {"eval", "exec", "compile", "__import__"}:
            findings.append(f"{node.lineno}: {name}()")
        elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            findings.append(f"{node.lineno}: torch.load without weights_only=True")
        elif name in {"torch.save", "np.save", "numpy.save"} or short in {"read_pickle", "to_pickle"}:
            findings.append(f"{node.lineno}: {name} (pickle-based format)")
        elif short == "load" and name.split(".")[0] in {"np", "numpy"} and _is_true(_keyword(node, "allow_pickle")):
            findings.append(f"{node.lineno}: {name}(allow_pickle=True)")
        elif name == "yaml.load" and "Safe" not in ast.unparse(_keyword(node, "Loader") or ast.Constant(None)):
            findings.append(f"{node.lineno}: yaml.load without SafeLoader")
        elif short in {"run", "Popen", "call", "check_call", "check_output"} and _is_true(_keyword(node, "shell")):
            findings.append(f"{node.lineno}: {name}(shell=True)")
        elif name == "os.system":
            findings.append(f"{node.lineno}: os.system()")
    return findings


def test_the_scanner_finds_what_it_looks_for() -> None:
    bad = "import pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\neval(x)\nnp.load(p, allow_pickle=True)\n"
    assert len(unsafe_calls(bad)) == 5
    assert unsafe_calls("torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(t)\n") == []


def test_no_pickle_no_unsafe_load_and_no_eval_in_the_sources() -> None:
    findings = {
        str(path): found
        for path in iter_python_sources(*SOURCE_PACKAGES)
        if (found := unsafe_calls(path.read_text(encoding="utf-8")))
    }
    assert findings == {}
    loads = [p for p in iter_python_sources(*SOURCE_PACKAGES) if "torch.load(" in p.read_text(encoding="utf-8")]
    assert [p.name for p in loads] == ["weights.py"]  # the only place that reads a torch checkpoint


def test_weights_files_are_loaded_with_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from padim.core.backbones import load_backbone, weights
    from padim.core.backbones.resnet import build_resnet

    path = tmp_path / "resnet18.pth"
    torch.save(build_resnet("resnet18").state_dict(), path)  # a weights file as torchvision ships it
    seen: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(weights.torch, "load", spy)

    backbone = load_backbone("resnet18", weights=str(path))

    assert seen and all(call.get("weights_only") is True for call in seen)
    assert len(backbone.weights_sha256) == 64


def test_no_task_result_is_pickled_by_prefect() -> None:
    """Prefect pickles persisted results by default: every padim task keeps its results in memory."""
    from prefect import Task
    from prefect.cache_policies import NO_CACHE

    found = [
        value
        for module in (
            padim_prefect.tasks.events,
            padim_prefect.tasks.promotion,
            padim_prefect.tasks.scoring,
            padim_prefect.tasks.storage,
            padim_prefect.tasks.training,
        )
        for value in vars(module).values()
        if isinstance(value, Task)
    ]
    assert len(found) >= 7
    for task in found:
        assert task.persist_result is False, task.name
        assert task.cache_policy is NO_CACHE, task.name
        assert task.result_serializer == "json", task.name
    from padim_prefect.flows.nightly import nightly
    from padim_prefect.flows.retrain import retrain
    from padim_prefect.flows.score import score
    from padim_prefect.flows.train import train
    from padim_prefect.flows.watch import watch

    for flow in (nightly, retrain, score, train, watch):
        assert flow.persist_result is False and flow.result_serializer == "json", flow.name


def test_reports_and_heat_maps_are_written_only_under_the_store_root(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    night = tmp_path / "night"
    hostile = [
        "up..%2F..%2Fescape.png",
        "a..b.png",
        "-rf.png",
        "name with spaces.png",
        "ünïcödé.png",
        "$(touch pwned).png",
        "'; DROP TABLE reports; --.png",
    ]
    write_defective(night, hostile)
    store_root = tmp_path / "area" / "store"
    trained.copy_to(store_root)
    outside_before = files_under(tmp_path) - {f"area/store/{f}" for f in files_under(store_root)}

    result = score_folder(str(store_root), str(night), shard_size=3)

    rows = query_reports(str(store_root), product=PRODUCT)
    assert sorted(os.path.basename(u) for u in rows["image_uri"]) == sorted(hostile)
    assert result["n_anomalies"] >= 1 and rows["heatmap_uri"].notna().sum() == result["n_anomalies"]
    outside_after = files_under(tmp_path) - {f"area/store/{f}" for f in files_under(store_root)}
    assert outside_after == outside_before  # nothing was written outside the store root
    written = files_under(store_root) - files_under(Path(trained.store))
    heatmaps = {f for f in written if f.endswith(".png")}
    reports = {f for f in written if f.endswith(".parquet")}
    assert written == heatmaps | reports
    assert all(f.startswith(f"{PRODUCT}/heatmaps/{DAY}/{trained.version}/") for f in heatmaps)
    assert all(f.startswith(f"reports/product={PRODUCT}/date={DAY}/") for f in reports)
    assert not list(tmp_path.rglob("pwned")) and not list(tmp_path.rglob("escape.png*"))
    # Run ids and versions cannot steer a path out either.
    row = _ok_row(image_uri=str(night / hostile[0]), run_id="../../../evil")
    files = write_report_rows(str(store_root), [row], run_id="../../../evil")
    assert all(Path(f).resolve().is_relative_to(store_root / "reports" / f"product={PRODUCT}") for f in files)
    with pytest.raises(ValueError, match="invalid"):
        heatmap_url(ModelStore(str(store_root)), PRODUCT, rows.iloc[0]["date"], "../../v1", "ab" * 32)


# ---- the document's counts -----------------------------------------------------------------------------------


def suite_counts() -> dict[str, int]:
    """The counts ``docs/reliability.md`` states, from the suite's own catalogues of cases."""
    from tests.test_image_robustness import CAMERA_MODES
    from tests.test_reliability_faults import RUNTIME_FAULTS
    from tests.test_uris import ODD_NAMES

    training_folders = len(NO_USABLE_IMAGE) + len(TOO_FEW) + 1  # + the folder of identical copies
    return {
        "bad inputs tried": len(BAD_FILES)
        + len(ODD_VALID_FILES)
        + training_folders
        + len(HOSTILE_PRODUCTS)
        + len(NON_FINITE_MAPS),
        "faults injected": len(UNSERVABLE) + len(MISSING_MODEL) + len(TAMPERING) + len(RUNTIME_FAULTS),
        "odd file names scored, one row each": len(ODD_NAMES) + 1,  # + the name that is not UTF-8
        "PIL modes converted": len(CAMERA_MODES),
    }


def test_the_reliability_document_states_the_suites_counts_and_real_tests() -> None:
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "reliability.md").read_text(encoding="utf-8")
    for name, value in suite_counts().items():
        assert f"| {name} | {value} |" in text, f"docs/reliability.md must state '| {name} | {value} |'"
    cited = re.findall(r"(tests/test_\w+\.py)::(\w+)", text)
    assert len(cited) >= 20
    for path, test in cited:
        source = (repo / path).read_text(encoding="utf-8")
        assert f"def {test}(" in source, f"docs/reliability.md cites {path}::{test}, which does not exist"
