"""One URI per file, names of any bytes, and empty or odd paths refused before any work.

* the same folder named five ways (plain, ``..``, ``//``, relative, through a symlink) is listed
  with the same URIs, and scoring it under each name adds rows once;
* file names with spaces, ``#``, ``?``, ``::``, a newline, unicode and bytes that are not valid
  UTF-8 each get their row; the non-UTF-8 name is stored as a percent-encoded ``file://`` URL that
  reads back the same bytes;
* ``""``, blanks, ``s3://`` without a bucket and an input folder inside the store are refused with
  one clear error, by the flows and by the command line, before anything is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from padim_prefect.flows.params import check_outside_store, resolve_url
from padim_prefect.flows.score import score

from padim.errors import ConfigError
from padim.io.fsio import local_uri, url_to_fs
from padim.io.listing import list_images
from padim.io.loading import read_image
from padim.io.store import ModelStore
from padim.reports import query_reports
from tests.flow_helpers import local_dir, png_bytes, texture, write_images
from tests.reliability_support import PRODUCT, TrainedStore, trained_store
from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401

pytest_plugins = ["tests.prefect_harness"]

NIGHT = "2026-11-27"

ODD_NAMES = [
    "with space.png",
    "hash#1.png",
    "question?.png",
    "dbl::colon.png",
    "new\nline.png",
    "ünïcødé-部品.png",
    "percent%41.png",
]
"""Valid UTF-8 names that URL parsers like to mangle."""

NOT_UTF8 = b"caf\xe9-\xff.png"
"""A Latin-1 camera's file name: not valid UTF-8."""


@pytest.fixture(scope="module")
def trained(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    return trained_store(tmp_path_factory)


def five_names(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The folder as a plain path, with ``..``, with ``//``, relative, and through a symlink."""
    link = tmp_path / "link-to-night"
    link.symlink_to(folder, target_is_directory=True)
    monkeypatch.chdir(folder.parent)
    return [
        str(folder),
        f"{folder.parent}/../{folder.parent.name}/{folder.name}",
        f"{folder.parent}//{folder.name}/",
        folder.name,
        str(link),
    ]


def test_a_folder_named_five_ways_lists_the_same_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    night = local_dir(tmp_path / "night")
    write_images(night, 3, seed=41, prefix="uri")
    listings = [list_images(name) for name in five_names(Path(night), tmp_path, monkeypatch)]
    assert all(listing == listings[0] for listing in listings), listings
    assert len(listings[0]) == 3
    assert all(uri.startswith(os.path.realpath(night) + "/") for uri in listings[0])


def test_a_folder_named_five_ways_is_scored_once(
    trained: TrainedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = trained.copy_to(tmp_path / "store")
    night = local_dir(tmp_path / "night")
    images = write_images(night, 3, seed=42, prefix="once")
    runs = [
        score(product=PRODUCT, images_url=name, store=store, date=NIGHT, device="cpu", shard_size=2)
        for name in five_names(Path(night), tmp_path, monkeypatch)
    ]
    assert [r["n_scored"] for r in runs] == [len(images), 0, 0, 0, 0]
    frame = query_reports(store, product=PRODUCT, since=NIGHT, until=NIGHT)
    assert len(frame) == len(images) and frame["image_uri"].is_unique


def test_names_of_any_bytes_each_get_one_row(trained: TrainedStore, tmp_path: Path) -> None:
    store = trained.copy_to(tmp_path / "store")
    night = local_dir(tmp_path / "odd")
    rng = np.random.default_rng(43)
    for name in ODD_NAMES:
        (Path(night) / name).write_bytes(png_bytes(texture(rng)))
    raw = os.fsencode(night) + b"/" + NOT_UTF8
    with open(raw, "wb") as handle:
        handle.write(png_bytes(texture(rng)))

    first = score(product=PRODUCT, images_url=night, store=store, date=NIGHT, device="cpu", shard_size=3)
    again = score(product=PRODUCT, images_url=night, store=store, date=NIGHT, device="cpu", shard_size=3)
    frame = query_reports(store, product=PRODUCT, since=NIGHT, until=NIGHT)

    expected = {os.path.join(night, name) for name in ODD_NAMES} | {local_uri(os.fsdecode(raw))}
    assert set(frame["image_uri"]) == expected and len(frame) == len(expected)
    assert (frame["status"] == "ok").all(), frame[["image_uri", "status", "error"]]
    assert (first["n_scored"], again["n_scored"], again["n_skipped"]) == (len(expected), 0, len(expected))
    encoded = local_uri(os.fsdecode(raw))
    assert encoded.startswith("file://") and encoded.endswith("caf%E9-%FF.png")
    _, path = url_to_fs(encoded)
    assert os.fsencode(path) == raw  # lossless: the stored URI reads back the same bytes
    record, image = read_image(encoded)
    assert image is not None and record.error is None and record.uri == encoded


def test_s3_keys_with_odd_names_are_listed_exactly_and_read(s3_bucket: str) -> None:  # noqa: F811
    fs, bucket = url_to_fs(s3_bucket)
    data = png_bytes(texture(np.random.default_rng(44)))
    names = ["a?b.png", "c#d.png", "e f.png", "g::h.png", "i%41.png", "ünï.png"]
    for name in names:
        fs.pipe_file(f"{bucket}/night/{name}", data)
    uris = list_images(f"{s3_bucket}/night")
    assert uris == sorted(f"{s3_bucket}/night/{name}" for name in names)
    for uri in uris:
        record, image = read_image(uri)
        assert record.error is None and image is not None, (uri, record.error)


@pytest.mark.parametrize("url", ["", "   ", "s3://", "s3:///prefix", "S3://"])
def test_empty_paths_and_urls_without_a_bucket_are_refused(url: str) -> None:
    with pytest.raises(ConfigError, match=r"no .* given|names no bucket"):
        resolve_url(url, "production images folder")


def test_an_input_folder_inside_the_store_is_refused(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path / "store"))
    inside = local_dir(tmp_path / "store" / PRODUCT / "heatmaps")
    with pytest.raises(ConfigError, match="inside the model store"):
        check_outside_store(inside, store, "production images")
    with pytest.raises(ConfigError, match="inside the model store"):
        check_outside_store(str(tmp_path / "store"), store, "production images")
    beside = local_dir(tmp_path / "store-night")  # a sibling whose name starts like the store's
    assert check_outside_store(beside, store, "production images") == beside
    remote = ModelStore("s3://factory/store")
    with pytest.raises(ConfigError, match="inside the model store"):
        check_outside_store("s3://factory/store/bottle/heatmaps", remote, "production images")
    assert check_outside_store("s3://factory/store-2/night", remote, "production images")


def padim(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the installed command line in a child process."""
    command = [sys.executable, "-m", "padim_cli.main", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score", "-p", PRODUCT, "--images", ""], "no production images folder given"),
        (["score", "-p", PRODUCT, "--images", "  "], "no production images folder given"),
        (["train", "-p", PRODUCT, "--normal", ""], "no normal images folder given"),
        (["score", "-p", PRODUCT, "--images", "s3://"], "names no bucket"),
        (["report", "-p", PRODUCT, "--store", "s3://", "--summary"], "names no bucket"),
        (["score", "-p", PRODUCT, "--images", f"store/{PRODUCT}"], "inside the model store"),
    ],
)
def test_the_command_line_refuses_empty_and_odd_paths_before_any_work(
    args: list[str], message: str, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    local_dir(store / PRODUCT)
    env = {**os.environ, "PADIM_STORE": str(store), "PADIM_PROGRESS": "0"}
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = padim(*args, cwd=tmp_path, env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
