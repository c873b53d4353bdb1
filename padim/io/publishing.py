"""How a model version folder becomes visible to readers, and how it stops being visible.

A version is visible only once its ``_COMPLETE`` marker exists; the marker is written only after
every file listed in ``manifest.json`` has been read back and matched its size and sha256, and it
records the manifest's own sha256. Locally the whole version is built in a hidden
``.staging-<version>-<rand>`` folder and renamed into place (:func:`publish_local`); on object
stores (no rename) it is written under its final prefix and the marker is the commit
(:func:`publish_remote`). Removal runs the other way: the version is made invisible first
(:func:`remove_version`), so an interrupted removal or publish leaves only what
:func:`remove_leftovers` deletes. Moving ``LATEST`` is :class:`padim.io.store.ModelStore`'s job.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from padim.errors import ModelIntegrityError, StoreError
from padim.io.fsio import fsync_dir, join_url, sha256_of, url_to_fs, write_bytes_atomic
from padim.io.manifest import to_json_bytes, utc_now_iso, verify_folder
from padim.io.store_layout import (
    COMPLETE_MARKER,
    MANIFEST_NAME,
    STAGING_PREFIX,
    VERSION_PATTERN,
    new_version,
    validate_version,
)

__all__ = [
    "WriteCallback",
    "complete_version_names",
    "is_complete",
    "publish_local",
    "publish_remote",
    "remove_leftovers",
    "remove_version",
]

_MAX_VERSION_ATTEMPTS = 5

WriteCallback = Callable[[str], None]
"""Writes every file of a model into the folder URL it is given, ``manifest.json`` last."""


def publish_local(models_url: str, product: str, write: WriteCallback, version: str | None, *, store_root: str) -> str:
    """Stage a version in a hidden folder, verify it, mark it complete, rename it into place.

    Args:
        models_url: The product's models folder (local).
        product: Product name (for the marker and messages).
        write: Callback writing the model files into the folder URL it receives.
        version: Version name (validated); default :func:`~padim.io.store_layout.new_version`.
        store_root: The store root (for messages).

    Returns:
        The published version name.

    Raises:
        ModelIntegrityError: The written files do not match the manifest.
        StoreError: ``write`` raised, the version already exists, or the folder cannot be written.
    """
    _, models_path = url_to_fs(models_url)
    version = version or new_version()
    final_path = os.path.join(models_path, version)
    staging_name = f"{STAGING_PREFIX}{version}-{secrets.token_hex(4)}"
    staging_path = os.path.join(models_path, staging_name)
    try:
        os.makedirs(models_path, exist_ok=True)
        if os.path.exists(final_path):
            raise StoreError(f"version {version} of {product!r} already exists in {store_root}")
        os.mkdir(staging_path)
    except OSError as exc:
        raise StoreError(f"cannot create {staging_path}: {exc}") from exc
    staging_url = join_url(models_url, staging_name)
    try:
        _write_and_verify(product, version, write, staging_url)
        _rename_into_place(staging_path, final_path, product, version)
    except BaseException as exc:
        shutil.rmtree(staging_path, ignore_errors=True)
        _raise_publish_error(exc, product, version)
    fsync_dir(models_path)
    return version


def publish_remote(
    models_url: str, product: str, write: WriteCallback, version: str | None, *, explicit: bool, store_root: str
) -> str:
    """Write a version under its final prefix, verify it, then write the ``_COMPLETE`` marker last.

    Args:
        models_url: The product's models folder (object store).
        product: Product name (for the marker and messages).
        write: Callback writing the model files into the folder URL it receives.
        version: Version name (validated); default :func:`~padim.io.store_layout.new_version`.
        explicit: The caller named the version: an existing one is an error, not a retry.
        store_root: The store root (for messages).

    Returns:
        The published version name.

    Raises:
        ModelIntegrityError: The written files do not match the manifest.
        StoreError: ``write`` raised, the version already exists, or no free name was found.
    """
    fs, _ = url_to_fs(models_url)
    version_url, version = _claim_remote_version(models_url, product, version, explicit, store_root)
    _, version_path = url_to_fs(version_url)
    try:
        _write_and_verify(product, version, write, version_url)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            fs.rm(version_path, recursive=True)
        _raise_publish_error(exc, product, version)
    return version


def is_complete(version_url: str) -> bool:
    """Tell whether a version folder is committed.

    Args:
        version_url: A version folder.

    Returns:
        True when the version's ``_COMPLETE`` marker exists.
    """
    return _file_exists(join_url(version_url, COMPLETE_MARKER))


def complete_version_names(models_url: str) -> list[str]:
    """List the version folders that hold a ``_COMPLETE`` marker (one listing).

    Args:
        models_url: A product's models folder.

    Returns:
        Version names, sorted; ``[]`` when the folder does not exist.
    """
    fs, models_path = url_to_fs(models_url)
    fs.invalidate_cache(models_path)
    try:
        paths = fs.find(models_path, withdirs=False)
    except FileNotFoundError:
        return []
    prefix = models_path.rstrip("/") + "/"
    names = []
    for path in paths:
        relative = path[len(prefix) :] if path.startswith(prefix) else ""
        parts = relative.split("/")
        if len(parts) == 2 and parts[1] == COMPLETE_MARKER and VERSION_PATTERN.fullmatch(parts[0]):
            names.append(parts[0])
    return sorted(set(names))


def remove_version(models_url: str, version: str, *, local: bool) -> None:
    """Make a version invisible, then delete its files.

    Locally its folder is renamed to a hidden staging name first; on object stores its
    ``_COMPLETE`` marker is deleted first.

    Args:
        models_url: The product's models folder.
        version: Version name (validated).
        local: The store is on local disk.
    """
    url = join_url(models_url, validate_version(version))
    fs, path = url_to_fs(url)
    if local:
        hidden = os.path.join(os.path.dirname(path), f"{STAGING_PREFIX}pruned-{version}-{secrets.token_hex(4)}")
        os.rename(path, hidden)
        fsync_dir(os.path.dirname(path))
        shutil.rmtree(hidden, ignore_errors=True)
        return
    fs.rm(f"{path}/{COMPLETE_MARKER}")
    fs.rm(path, recursive=True)


def remove_leftovers(models_url: str, *, local: bool, older_than_hours: float) -> list[str]:
    """Remove leftovers of interrupted publishes (and removals) older than a threshold.

    Locally these are ``.staging-*`` folders; on object stores, version prefixes without a
    ``_COMPLETE`` marker. A local version folder without the marker is never deleted (the
    store never creates one: it may be a hand-made copy).

    Args:
        models_url: The product's models folder.
        local: The store is on local disk.
        older_than_hours: Only remove leftovers whose newest file is older than this.

    Returns:
        URLs of the removed folders.
    """
    fs, models_path = url_to_fs(models_url)
    fs.invalidate_cache(models_path)
    try:
        entries = fs.ls(models_path, detail=True)
    except FileNotFoundError:
        return []
    cutoff = time.time() - older_than_hours * 3600.0
    removed: list[str] = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        url = join_url(models_url, name)
        leftover = (
            name.startswith(STAGING_PREFIX)
            if local
            else (bool(VERSION_PATTERN.fullmatch(name)) and not is_complete(url))
        )
        if leftover and _newest_mtime(fs, entry["name"]) < cutoff:
            fs.rm(entry["name"], recursive=True)
            removed.append(url)
    return removed


def _claim_remote_version(
    models_url: str, product: str, version: str | None, explicit: bool, store_root: str
) -> tuple[str, str]:
    """Pick a version whose prefix is still empty on the object store: ``(folder URL, version)``."""
    for _ in range(_MAX_VERSION_ATTEMPTS):
        candidate = version or new_version()
        url = join_url(models_url, validate_version(candidate))
        fs, path = url_to_fs(url)
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return url, candidate
        if explicit:
            raise StoreError(f"version {candidate} of {product!r} already exists in {store_root}")
    raise StoreError(f"could not find a free version name for {product!r} in {store_root}")


def _write_and_verify(product: str, version: str, write: WriteCallback, folder_url: str) -> None:
    """Run the caller's write, verify the folder, then write the ``_COMPLETE`` marker."""
    write(folder_url)
    if _file_exists(join_url(folder_url, COMPLETE_MARKER)):
        raise ModelIntegrityError(
            f"the model writer created {COMPLETE_MARKER} in {folder_url}; only the store may write it"
        )
    manifest = verify_folder(folder_url)
    marker = {
        "product": product,
        "version": version,
        "completed_at": utc_now_iso(),
        "files": sorted([*manifest["files"], MANIFEST_NAME]),
        # manifest.json holds the other files' checksums; the marker holds the manifest's.
        "manifest_sha256": sha256_of(join_url(folder_url, MANIFEST_NAME))[0],
    }
    write_bytes_atomic(join_url(folder_url, COMPLETE_MARKER), to_json_bytes(marker))


def _file_exists(url: str) -> bool:
    """True when a file exists (fresh listing on object stores)."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    return bool(fs.isfile(path))


def _rename_into_place(staging_path: str, final_path: str, product: str, version: str) -> None:
    """Atomically rename a staged version folder to its final name."""
    if os.path.exists(final_path):
        raise StoreError(f"version {version} of {product!r} already exists at {final_path}")
    try:
        os.rename(staging_path, final_path)
    except OSError as exc:
        raise StoreError(f"cannot move {staging_path} to {final_path}: {exc}") from exc


def _raise_publish_error(exc: BaseException, product: str, version: str) -> None:
    """Re-raise a publish failure: store errors as they are, others wrapped in StoreError."""
    if isinstance(exc, ModelIntegrityError | StoreError) or not isinstance(exc, Exception):
        raise exc
    raise StoreError(
        f"publishing version {version} of {product!r} failed, nothing was published ({type(exc).__name__}: {exc})"
    ) from exc


def _newest_mtime(fs: Any, folder_path: str) -> float:
    """Newest modification time (epoch seconds) of the files under a folder."""
    newest = 0.0
    try:
        infos = list(fs.find(folder_path, withdirs=True, detail=True).values())
    except FileNotFoundError:
        return newest
    with contextlib.suppress(OSError, ValueError):
        infos.append(fs.info(folder_path))
    for info in infos:
        stamp = info.get("mtime", info.get("LastModified"))
        if isinstance(stamp, datetime):
            newest = max(newest, stamp.timestamp())
        elif isinstance(stamp, int | float):
            newest = max(newest, float(stamp))
    return newest
