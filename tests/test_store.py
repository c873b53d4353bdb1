"""Tests for the model store (padim.io.store and its helpers): atomic publishing on local disk and S3 (moto)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest

from padim.errors import (
    ConfigError,
    InvalidProductNameError,
    ModelIntegrityError,
    ModelNotFoundError,
    StoreError,
)
from padim.io.fsio import exists, join_url, read_bytes, url_to_fs, write_bytes_atomic
from padim.io.manifest import write_manifest
from padim.io.store import ModelStore
from padim.io.store_layout import COMPLETE_MARKER, default_store_url, new_version, validate_product
from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ModelStore:
    """A fresh store on local disk or on a fresh S3 bucket."""
    if request.param == "local":
        return ModelStore(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    return ModelStore(f"{bucket}/padim")


def put(url: str, data: bytes) -> None:
    """Write a file through fsspec (as a model writer would)."""
    with fsspec.open(url, "wb") as handle:
        handle.write(data)


def model_writer(payload: bytes, n_train: int = 10) -> Callable[[str], None]:
    """A write callback that stores two files and a manifest."""

    def write(url: str) -> None:
        put(join_url(url, "weights.bin"), payload)
        put(join_url(url, "stats", "mean.bin"), payload[::-1])
        write_manifest(url, {"backbone": "efficientnet_lite0", "n_train": n_train, "image_size": 224})

    return write


def listed(store: ModelStore, product: str) -> list[str]:
    """Version names as listed (newest first)."""
    return [info.version for info in store.versions(product)]


# ---- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "a/b", "Widget", "", "x" * 65, "a..b", ".hidden", "-x", "a b", "a\\b"])
def test_invalid_product_names_rejected(name: str) -> None:
    with pytest.raises(InvalidProductNameError, match="product name"):
        validate_product(name)


@pytest.mark.parametrize("name", ["bottle", "tile-2.v1", "a", "x" * 64, "line_3"])
def test_valid_product_names_accepted(name: str) -> None:
    assert validate_product(name) == name


def test_version_names_sort_by_time() -> None:
    from datetime import datetime, timezone

    older = new_version(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    newer = new_version(datetime(2026, 1, 2, 3, 4, 6, tzinfo=timezone.utc))
    assert older.startswith("v20260102T030405Z-") and len(older) == len("v20260102T030405Z-") + 6
    assert older < newer


def test_default_store_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PADIM_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_store_url() == str(tmp_path / "padim-store")
    monkeypatch.setenv("PADIM_STORE", "s3://bucket/models/")
    assert default_store_url() == "s3://bucket/models"
    assert ModelStore().root == "s3://bucket/models"
    monkeypatch.setenv("PADIM_STORE", "rel")
    assert default_store_url() == str(tmp_path / "rel")


def test_artifact_url(tmp_path: Path) -> None:
    store = ModelStore("s3://bucket/root")
    assert store.artifact_url("bottle", "partials/run-1", "shard-0.bin") == (
        "s3://bucket/root/bottle/partials/run-1/shard-0.bin"
    )
    assert store.artifact_url("bottle") == "s3://bucket/root/bottle"
    local = ModelStore(str(tmp_path))
    assert local.artifact_url("bottle", "heatmaps", "a.png") == str(tmp_path / "bottle" / "heatmaps" / "a.png")
    with pytest.raises(ConfigError, match=r"invalid artifact path segment '\.\.'"):
        store.artifact_url("bottle", "../other")
    with pytest.raises(ConfigError, match="reserved"):
        store.artifact_url("bottle", "models", "x")
    with pytest.raises(InvalidProductNameError):
        store.artifact_url("../etc", "x")


# ---- publish and read ---------------------------------------------------------------------------


def test_publish_and_load(store: ModelStore) -> None:
    with pytest.raises(ModelNotFoundError, match="train one with `padim train --product bottle"):
        store.latest("bottle")
    assert store.versions("bottle") == []
    assert store.products() == []

    version = store.publish("bottle", model_writer(b"weights-1"))
    assert store.latest("bottle") == version
    url = store.version_url("bottle", version)
    assert url == store.latest_url("bottle")
    assert read_bytes(join_url(url, "weights.bin")) == b"weights-1"
    assert read_bytes(join_url(url, "stats/mean.bin")) == b"1-sthgiew"
    manifest = store.read_manifest("bottle", version)
    assert manifest["backbone"] == "efficientnet_lite0"
    assert set(manifest["files"]) == {"weights.bin", "stats/mean.bin"}
    assert manifest["files"]["weights.bin"]["size"] == 9
    assert store.verify("bottle", version) == manifest
    marker = json.loads(read_bytes(join_url(url, COMPLETE_MARKER)))
    assert marker["files"] == ["manifest.json", "stats/mean.bin", "weights.bin"]

    (info,) = store.versions("bottle")
    assert (info.version, info.url, info.is_latest, info.size_bytes) == (version, url, True, 18)
    assert info.summary == {
        "backbone": "efficientnet_lite0",
        "n_train": 10,
        "image_size": 224,
        "created_at": manifest["created_at"],
    }
    assert info.created_at == manifest["created_at"]
    assert store.products() == ["bottle"]
    if store.root.startswith("s3://"):
        assert url.startswith("s3://")


def test_versions_newest_first_and_rollback(store: ModelStore) -> None:
    published = [store.publish("tile", model_writer(f"w{i}".encode(), n_train=i)) for i in range(3)]
    explicit = store.publish("tile", model_writer(b"w3", n_train=3), version="a-manual-name")
    assert listed(store, "tile") == [explicit, *reversed(published)]
    assert [info.summary["n_train"] for info in store.versions("tile")] == [3, 2, 1, 0]
    assert store.latest("tile") == explicit
    store.set_latest("tile", published[0])
    assert store.latest("tile") == published[0]
    assert [info.is_latest for info in store.versions("tile")] == [False, False, False, True]
    with pytest.raises(ModelNotFoundError, match="no complete version 'nope'"):
        store.set_latest("tile", "nope")
    with pytest.raises(StoreError, match="already exists"):
        store.publish("tile", model_writer(b"again"), version="a-manual-name")
    assert store.latest("tile") == published[0]


def test_latest_moves_only_after_commit(store: ModelStore) -> None:
    first = store.publish("bottle", model_writer(b"first"))
    seen: dict[str, object] = {}

    def observing_writer(url: str) -> None:
        model_writer(b"second")(url)
        seen["latest"] = store.latest("bottle")
        seen["listed"] = listed(store, "bottle")

    second = store.publish("bottle", observing_writer)
    assert seen == {"latest": first, "listed": [first]}
    assert store.latest("bottle") == second
    assert listed(store, "bottle") == [second, first]


def test_interrupted_publish_keeps_previous_version(store: ModelStore) -> None:
    first = store.publish("bottle", model_writer(b"good model"))

    def crashing_writer(url: str) -> None:
        put(join_url(url, "weights.bin"), b"half")
        put(join_url(url, "stats/mean.bin"), b"half too")
        raise RuntimeError("worker killed while writing statistics")

    with pytest.raises(StoreError, match="nothing was published") as caught:
        store.publish("bottle", crashing_writer, version="v-half")
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert store.latest("bottle") == first
    assert listed(store, "bottle") == [first]
    assert read_bytes(join_url(store.latest_url("bottle"), "weights.bin")) == b"good model"
    with pytest.raises(ModelNotFoundError):
        store.version_url("bottle", "v-half")
    models = store.models_url("bottle")
    fs, models_path = url_to_fs(models)
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(models_path)) == sorted(["LATEST", first])


def test_crash_leftovers_invisible_and_collected(store: ModelStore) -> None:
    first = store.publish("bottle", model_writer(b"good"))
    models = store.models_url("bottle")
    # A process killed mid-publish leaves files without the _COMPLETE marker (S3) or a staging
    # folder (local); simulate both, including a manifest, as the kill can come after it.
    leftovers = [join_url(models, ".staging-v2-abcd"), join_url(models, "v20990101T000000Z-abcdef")]
    for url in leftovers:
        model_writer(b"partial")(url)
    assert listed(store, "bottle") == [first]
    assert store.latest("bottle") == first
    with pytest.raises(ModelNotFoundError):
        store.read_manifest("bottle", "v20990101T000000Z-abcdef")
    assert store.delete_incomplete("bottle") == []  # too recent to be collected
    removed = store.delete_incomplete("bottle", older_than_hours=0)
    if store.root.startswith("s3://"):
        assert removed == [leftovers[1]]
        assert not exists(leftovers[1])
    else:
        assert removed == [leftovers[0]]
        assert not exists(leftovers[0])
        assert exists(leftovers[1])  # never created by the store locally: left alone
    assert store.latest("bottle") == first


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("flip", "does not match its sha256"),
        ("truncate", "has 5 bytes, the manifest says 8"),
        ("delete", "listed in the manifest but missing"),
        ("no-manifest", "manifest.json is missing"),
        ("bad-json", "not valid JSON"),
        ("escape", "invalid file name '../evil'"),
        ("marker", "only the store may write it"),
    ],
)
def test_publish_verification_detects_bad_files(store: ModelStore, tamper: str, message: str) -> None:
    first = store.publish("bottle", model_writer(b"good"))

    def tampering_writer(url: str) -> None:
        put(join_url(url, "weights.bin"), b"12345678")
        if tamper == "no-manifest":
            return
        write_manifest(url, {"n_train": 1})
        if tamper == "flip":
            put(join_url(url, "weights.bin"), b"12345679")
        elif tamper == "truncate":
            put(join_url(url, "weights.bin"), b"12345")
        elif tamper == "delete":
            fs, path = url_to_fs(join_url(url, "weights.bin"))
            fs.rm(path)
        elif tamper == "bad-json":
            put(join_url(url, "manifest.json"), b"{not json")
        elif tamper == "escape":
            manifest = {"files": {"../evil": {"sha256": "0" * 64, "size": 1}}}
            put(join_url(url, "manifest.json"), json.dumps(manifest).encode())
        elif tamper == "marker":
            put(join_url(url, COMPLETE_MARKER), b"{}")

    with pytest.raises(ModelIntegrityError, match=message):
        store.publish("bottle", tampering_writer)
    assert store.latest("bottle") == first
    assert listed(store, "bottle") == [first]


def test_verify_detects_tampering_after_publish(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path))
    version = store.publish("bottle", model_writer(b"original"))
    (tmp_path / "bottle" / "models" / version / "weights.bin").write_bytes(b"ORIGINAL")
    with pytest.raises(ModelIntegrityError, match=r"weights\.bin .* does not match its sha256"):
        store.verify("bottle", version)


def test_concurrent_publishers_get_distinct_versions(store: ModelStore) -> None:
    results: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def publish(index: int) -> None:
        try:
            version = store.publish("press", model_writer(f"model {index}".encode(), n_train=index))
        except BaseException as exc:  # pragma: no cover - reported below
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(version)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 6
    assert sorted(listed(store, "press")) == sorted(results)
    assert store.latest("press") in results
    for version in results:
        store.verify("press", version)


def test_latest_pointer_edge_cases(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path))
    version = store.publish("bottle", model_writer(b"m"))
    pointer = store.models_url("bottle") + "/LATEST"
    write_bytes_atomic(pointer, f"{version}\n".encode())  # hand-edited plain text is accepted
    assert store.latest("bottle") == version
    write_bytes_atomic(pointer, b'{"version": "v-gone"}')
    with pytest.raises(ModelNotFoundError, match="points to version 'v-gone'"):
        store.latest("bottle")
    write_bytes_atomic(pointer, b'{"version": "../../etc"}')
    with pytest.raises(StoreError, match="corrupt"):
        store.latest("bottle")
    assert os.path.isdir(tmp_path / "bottle" / "models" / version)


def test_file_url_root(tmp_path: Path) -> None:
    store = ModelStore(f"file://{tmp_path}/")
    version = store.publish("bottle", model_writer(b"m"))
    assert store.root == f"file://{tmp_path}"
    assert store.version_url("bottle", version) == f"file://{tmp_path}/bottle/models/{version}"
    assert (tmp_path / "bottle" / "models" / version / "weights.bin").read_bytes() == b"m"
    assert listed(store, "bottle") == [version]
    assert not [p.name for p in (tmp_path / "bottle" / "models").iterdir() if p.name.startswith(".")]


def test_store_rejects_bad_product_everywhere(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path))
    for call in (
        lambda: store.publish("../x", model_writer(b"m")),
        lambda: store.latest("A"),
        lambda: store.versions("a/b"),
        lambda: store.version_url("", "v1"),
    ):
        with pytest.raises(InvalidProductNameError):
            call()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="invalid model version"):
        store.publish("bottle", model_writer(b"m"), version="../v1")
