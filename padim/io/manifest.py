"""Manifests of model version folders: writing them, and checking a folder against its manifest.

``manifest.json`` lists every other file of a version with its sha256 and size
(``{"files": {name: {"sha256", "size"}}, ...}`` plus summary keys); the ``_COMPLETE`` marker the
store writes last records the manifest's own sha256. A model writer calls :func:`write_manifest`
last; the store reads every listed file back (:func:`verify_folder`) before committing a version,
and checks the manifest against its marker (:func:`check_manifest_digest`) before trusting it.
Also the small JSON helpers the store's other control files (``LATEST``, ``CANDIDATES``,
``_COMPLETE``) share.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from padim.errors import ModelIntegrityError
from padim.io.fsio import join_url, read_bytes, sha256_of, url_to_fs, write_bytes_atomic
from padim.io.store_layout import COMPLETE_MARKER, MANIFEST_NAME

__all__ = [
    "check_manifest_digest",
    "describe_files",
    "loads_or_empty",
    "read_folder_manifest",
    "to_json_bytes",
    "utc_now_iso",
    "verify_folder",
    "write_manifest",
]

_RESERVED_NAMES = frozenset({MANIFEST_NAME, COMPLETE_MARKER})


def describe_files(dir_url: str, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Hash files of a folder for a manifest (streamed, so large files are fine).

    Args:
        dir_url: Folder URL.
        names: File names relative to ``dir_url`` (``/`` allowed for sub-folders).

    Returns:
        ``{name: {"sha256": hex, "size": bytes}}``.
    """
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
        _check_file_name(name)
        digest, size = sha256_of(join_url(dir_url, name))
        entries[name] = {"sha256": digest, "size": size}
    return entries


def write_manifest(
    dir_url: str,
    summary: Mapping[str, Any] | None = None,
    files: Mapping[str, Mapping[str, Any]] | Iterable[str] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` into a folder (call it last from a publish ``write`` callback).

    Args:
        dir_url: The folder the model files were written to.
        summary: Top-level manifest keys (``backbone``, ``n_train``, ``image_size`` ...); these
            are what :meth:`padim.io.store.ModelStore.versions` reports. ``created_at`` is added if missing.
        files: Either ready entries ``{name: {"sha256", "size"}}`` (hashes computed while
            writing), or names to hash now, or None to hash every file already in the folder.

    Returns:
        The manifest as written.
    """
    if files is None:
        entries = describe_files(dir_url, _list_relative_files(dir_url))
    elif isinstance(files, Mapping):
        entries = {name: dict(entry) for name, entry in files.items()}
    else:
        entries = describe_files(dir_url, files)
    manifest: dict[str, Any] = dict(summary or {})
    manifest.setdefault("created_at", utc_now_iso())
    manifest["files"] = entries
    write_bytes_atomic(join_url(dir_url, MANIFEST_NAME), to_json_bytes(manifest))
    return manifest


def read_folder_manifest(folder_url: str) -> dict[str, Any]:
    """Read and parse ``manifest.json`` of a folder.

    Args:
        folder_url: A model version folder.

    Returns:
        The manifest.

    Raises:
        ModelIntegrityError: The manifest is missing, not valid JSON or has no ``files`` object.
    """
    manifest_url = join_url(folder_url, MANIFEST_NAME)
    try:
        raw = read_bytes(manifest_url)
    except FileNotFoundError as exc:
        raise ModelIntegrityError(f"{manifest_url} is missing; the model writer must write manifest.json last") from exc
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelIntegrityError(f"{manifest_url} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ModelIntegrityError(f"{manifest_url} has no 'files' object mapping names to sha256/size")
    return manifest


def check_manifest_digest(folder_url: str) -> None:
    """Check ``manifest.json`` against the sha256 its ``_COMPLETE`` marker recorded at publishing.

    Versions committed before the marker recorded it are accepted as they are.

    Args:
        folder_url: A model version folder.

    Raises:
        ModelIntegrityError: The manifest was altered (or replaced) after publishing.
    """
    try:
        marker = loads_or_empty(read_bytes(join_url(folder_url, COMPLETE_MARKER)))
    except FileNotFoundError:
        return
    expected = marker.get("manifest_sha256")
    if expected is None:
        return
    try:
        actual, _ = sha256_of(join_url(folder_url, MANIFEST_NAME))
    except FileNotFoundError as exc:
        raise ModelIntegrityError(f"{MANIFEST_NAME} is missing from {folder_url}") from exc
    if actual != expected:
        raise ModelIntegrityError(
            f"{MANIFEST_NAME} in {folder_url} does not match its sha256 recorded at publishing: "
            "the manifest was altered after publishing (checksum mismatch)"
        )


def verify_folder(folder_url: str) -> dict[str, Any]:
    """Check every file listed in a folder's manifest: present, right size, right sha256.

    Args:
        folder_url: A model version folder.

    Returns:
        The manifest.

    Raises:
        ModelIntegrityError: The manifest is invalid, or a file is missing, truncated or altered.
    """
    manifest = read_folder_manifest(folder_url)
    fs, folder_path = url_to_fs(folder_url)
    fs.invalidate_cache(folder_path)
    for name, entry in manifest["files"].items():
        _check_file_name(name)
        expected_sha, expected_size = _entry_fields(name, entry)
        file_url = join_url(folder_url, name)
        _, file_path = url_to_fs(file_url)
        try:
            actual_size = int(fs.size(file_path))
        except FileNotFoundError as exc:
            raise ModelIntegrityError(f"{name} is listed in the manifest but missing from {folder_url}") from exc
        if actual_size != expected_size:
            raise ModelIntegrityError(
                f"{name} in {folder_url} has {actual_size} bytes, the manifest says {expected_size}"
            )
        actual_sha, _ = sha256_of(file_url)
        if actual_sha != expected_sha:
            raise ModelIntegrityError(f"{name} in {folder_url} does not match its sha256 in the manifest")
    return manifest


def to_json_bytes(payload: Mapping[str, Any]) -> bytes:
    """Serialise a small JSON document (indented, sorted keys, trailing newline).

    Args:
        payload: The document.

    Returns:
        UTF-8 bytes.
    """
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")


def utc_now_iso() -> str:
    """Return the current UTC time, ISO 8601 with microseconds (sortable as a string).

    Returns:
        For example ``"2026-11-26T01:39:53.123456Z"``.
    """
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def loads_or_empty(raw: bytes | Exception | None) -> dict[str, Any]:
    """Parse JSON bytes into a dict; anything else gives ``{}``.

    Args:
        raw: File contents, or what a failed read returned instead (an exception or None).

    Returns:
        The parsed object when it is a dict, else ``{}``.
    """
    if not isinstance(raw, bytes | bytearray):
        return {}
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _list_relative_files(dir_url: str) -> list[str]:
    """Relative names of every file under a folder, except the manifest and the marker."""
    fs, root = url_to_fs(dir_url)
    fs.invalidate_cache(root)
    prefix = root.rstrip("/") + "/"
    names = [p[len(prefix) :] for p in fs.find(root, withdirs=False) if p.startswith(prefix)]
    return sorted(n for n in names if n not in _RESERVED_NAMES)


def _check_file_name(name: str) -> None:
    """Reject manifest entries that could escape the version folder."""
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or any(part in ("", ".", "..") for part in parts)
        or name in _RESERVED_NAMES
    ):
        raise ModelIntegrityError(f"manifest lists an invalid file name {name!r}")


def _entry_fields(name: str, entry: Any) -> tuple[str, int]:
    """Extract (sha256, size) from a manifest entry, rejecting malformed ones."""
    if not isinstance(entry, dict):
        raise ModelIntegrityError(f"manifest entry for {name} must be an object with sha256 and size")
    sha, size = entry.get("sha256"), entry.get("size")
    valid_sha = isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None
    if not valid_sha or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ModelIntegrityError(
            f"manifest entry for {name} needs a 64-hex 'sha256' and a non-negative integer 'size'"
        )
    return sha, size  # type: ignore[return-value]
