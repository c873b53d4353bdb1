"""Tests for padim.io.fsio: URL joining, local atomic writes, S3 through AWS_ENDPOINT_URL only."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from padim.io import fsio
from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://bucket/prefix", ("a", "b.png"), "s3://bucket/prefix/a/b.png"),
        ("s3://bucket/prefix/", ("/a/", "b/c"), "s3://bucket/prefix/a/b/c"),
        ("s3://bucket", ("k",), "s3://bucket/k"),
        ("/data/x", ("y", "z.bin"), "/data/x/y/z.bin"),
        ("/data/x", ("/etc/passwd",), "/data/x/etc/passwd"),
        ("file:///data/x", ("y",), "file:///data/x/y"),
        ("relative/dir", ("f",), os.path.join("relative/dir", "f")),
        ("s3://bucket/p", ("", "/"), "s3://bucket/p"),
    ],
)
def test_join_url_keeps_protocol(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert fsio.join_url(base, *parts) == expected


def test_protocol_and_locality() -> None:
    assert fsio.is_local("/tmp/x") and fsio.is_local("file:///tmp/x") and fsio.is_local("rel/x")
    assert not fsio.is_local("s3://bucket/x")
    assert fsio.protocol_of("S3://b/k") == "s3"
    assert fsio.protocol_of("/a") == "file"


def test_url_to_fs_local_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _, path = fsio.url_to_fs("sub/file.txt")
    assert path == str(tmp_path / "sub" / "file.txt")
    _, path = fsio.url_to_fs(f"file://{tmp_path}/a")
    assert path == f"{tmp_path}/a"


def test_write_bytes_atomic_local(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "LATEST"
    fsio.write_bytes_atomic(str(target), b"one")
    fsio.write_bytes_atomic(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["LATEST"]
    assert fsio.read_bytes(str(target)) == b"two"
    assert fsio.exists(str(target)) and not fsio.exists(str(tmp_path / "nope"))


def test_write_bytes_atomic_gives_the_usual_file_mode(tmp_path: Path) -> None:
    target = tmp_path / "report.parquet"
    fsio.write_bytes_atomic(str(target), b"x")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would create it, not mkstemp's 0600


def test_write_bytes_atomic_failure_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "pointer"
    fsio.write_bytes_atomic(str(target), b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fsio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        fsio.write_bytes_atomic(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["pointer"]


def test_sha256_of_streams_in_chunks(tmp_path: Path) -> None:
    data = os.urandom(100_003)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert fsio.sha256_of(str(path), chunk_bytes=4096) == (hashlib.sha256(data).hexdigest(), len(data))


def test_s3_round_trip_uses_env_endpoint(s3_bucket: str, s3_endpoint: str) -> None:  # noqa: F811
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
    url = fsio.join_url(s3_bucket, "models", "LATEST")
    assert not fsio.exists(url)
    fsio.write_bytes_atomic(url, b'{"version": "v1"}')
    assert fsio.exists(url)
    assert fsio.read_bytes(url) == b'{"version": "v1"}'
    assert fsio.sha256_of(url) == (hashlib.sha256(b'{"version": "v1"}').hexdigest(), 17)
    fs, path = fsio.url_to_fs(url)
    assert path == f"{s3_bucket.removeprefix('s3://')}/models/LATEST"
    assert fsio.to_url(fs, path) == url
    with pytest.raises(FileNotFoundError):
        fsio.read_bytes(fsio.join_url(s3_bucket, "missing"))
