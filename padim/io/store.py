"""Versioned per-product model store over fsspec (local disk or S3), with atomic publishing.

Layout under a store root URL (``$PADIM_STORE`` or ``./padim-store`` by default; names and
layout in :mod:`padim.io.store_layout`)::

    <root>/<product>/models/<version>/manifest.json   # {"files": {name: {"sha256", "size"}}, ...}
    <root>/<product>/models/<version>/_COMPLETE       # written last, after verification
    <root>/<product>/models/<version>/<model files>
    <root>/<product>/models/LATEST                    # {"version": ...}, moved after _COMPLETE
    <root>/<product>/models/CANDIDATES                # {"candidates": {version: {...}}}: not yet in use
    <root>/<product>/<other artifacts>                # see ModelStore.artifact_url

Versions are ``vYYYYMMDDTHHMMSSZ-xxxxxx``: the UTC publish time plus 6 random hex digits, so
concurrent publishers never collide and generated names sort by time. A version is visible to
readers only once its ``_COMPLETE`` marker exists; the marker is written only after every file
listed in ``manifest.json`` has been read back and matched its size and sha256
(:mod:`padim.io.manifest`). Locally the whole version is built in a hidden
``.staging-<version>-<rand>`` folder and renamed into place; on S3 (no rename) it is written under
its final prefix and the marker is the commit (:mod:`padim.io.publishing`). ``LATEST`` moves (one
atomic write) only after the version is committed. A version published with ``promote=False`` (a
retrain awaiting the promotion gate) is recorded in ``CANDIDATES`` instead;
:meth:`ModelStore.promote` moves ``LATEST`` to it later. :meth:`ModelStore.prune` removes old
versions but never the one in use or a candidate. Details in ``docs/storage.md``. Which backbone
weights a stored manifest may name is :mod:`padim.io.weights_trust`'s rule.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from padim.errors import ConfigError, ModelNotFoundError, StoreError
from padim.io.fsio import is_local, join_url, read_bytes, url_to_fs, write_bytes_atomic
from padim.io.manifest import (
    check_manifest_digest,
    loads_or_empty,
    read_folder_manifest,
    to_json_bytes,
    utc_now_iso,
    verify_folder,
)
from padim.io.publishing import (
    WriteCallback,
    complete_version_names,
    is_complete,
    publish_local,
    publish_remote,
    remove_leftovers,
    remove_version,
)
from padim.io.store_layout import (
    CANDIDATES_FILE,
    COMPLETE_MARKER,
    LATEST_POINTER,
    MANIFEST_NAME,
    MODELS_DIR,
    PRODUCT_NAME_PATTERN,
    VERSION_PATTERN,
    default_store_url,
    normalise_root,
    validate_product,
    validate_version,
)

__all__ = ["ModelStore", "VersionInfo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionInfo:
    """One complete version of a product's model.

    Attributes:
        product: Product name.
        version: Version name.
        url: Folder URL of the version's files.
        created_at: ``created_at`` from the manifest, else the commit time (ISO 8601 UTC).
        summary: Top-level manifest keys except ``files`` (backbone, n_train, thresholds ...).
        is_latest: True when ``LATEST`` points to this version.
        size_bytes: Total size of the files listed in the manifest.
        candidate: ``None``, or for a candidate (published, not in use) what ``CANDIDATES``
            records about it (``reason``, ``added_at``).
    """

    product: str
    version: str
    url: str
    created_at: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    is_latest: bool = False
    size_bytes: int = 0
    candidate: dict[str, Any] | None = None

    @property
    def is_candidate(self) -> bool:
        """True for a candidate: published but never promoted to the version in use."""
        return self.candidate is not None


class ModelStore:
    """Per-product versioned model store on a local folder or an S3 prefix.

    Args:
        root: Store root URL (local path, ``file://`` or ``s3://bucket/prefix``); default
            :func:`~padim.io.store_layout.default_store_url`.
    """

    def __init__(self, root: str | None = None) -> None:
        self._root = normalise_root(root) if root is not None else default_store_url()

    @property
    def root(self) -> str:
        """The store root URL (absolute for local stores)."""
        return self._root

    def __repr__(self) -> str:
        """Readable representation."""
        return f"ModelStore({self._root!r})"

    # ---- URLs ---------------------------------------------------------------------------------

    def product_url(self, product: str) -> str:
        """Folder URL of a product: ``<root>/<product>``."""
        return join_url(self._root, validate_product(product))

    def models_url(self, product: str) -> str:
        """Folder URL of a product's models: ``<root>/<product>/models``."""
        return join_url(self.product_url(product), MODELS_DIR)

    def artifact_url(self, product: str, *parts: str) -> str:
        """URL of a product artifact outside the model versions: ``<root>/<product>/<parts...>``.

        Used for partial statistics, heat maps and the like. Parts may contain ``/``.

        Args:
            product: Product name (validated).
            *parts: Path segments below the product folder.

        Returns:
            The URL.

        Raises:
            InvalidProductNameError: Invalid product name.
            ConfigError: A segment is empty-equivalent (``.``), ``..``, contains a backslash, or
                the first segment is the reserved ``models`` folder.
        """
        segments = [seg for part in parts for seg in str(part).split("/") if seg != ""]
        for seg in segments:
            if seg in (".", "..") or "\\" in seg:
                raise ConfigError(f"invalid artifact path segment {seg!r} in {'/'.join(parts)!r}")
        if segments and segments[0] == MODELS_DIR:
            raise ConfigError(
                f"'{MODELS_DIR}' is reserved for the model store; use ModelStore.publish or another folder"
            )
        return join_url(self.product_url(product), *segments)

    def version_url(self, product: str, version: str) -> str:
        """Folder URL of a complete version.

        Raises:
            ModelNotFoundError: The version does not exist or is not complete.
        """
        url = self._version_folder(product, version)
        if not is_complete(url):
            available = [info.version for info in self.versions(product)]
            hint = f"available: {', '.join(available[:5])}" if available else "none is published yet"
            raise ModelNotFoundError(f"no complete version {version!r} of product {product!r} in {self._root} ({hint})")
        return url

    def latest_url(self, product: str) -> str:
        """Folder URL of the version ``LATEST`` points to (see :meth:`latest`)."""
        return self._version_folder(product, self.latest(product))

    # ---- reading ------------------------------------------------------------------------------

    def latest(self, product: str) -> str:
        """Return the version ``LATEST`` points to.

        Raises:
            ModelNotFoundError: No model was ever published for the product, or the pointer names
                a version that is missing or incomplete.
            StoreError: The pointer file is unreadable.
        """
        pointer_url = join_url(self.models_url(product), LATEST_POINTER)
        try:
            raw = read_bytes(pointer_url)
        except FileNotFoundError as exc:
            raise ModelNotFoundError(
                f"no model for product {product!r} in {self._root}; "
                f"train one with `padim train --product {product} ...`"
            ) from exc
        except OSError as exc:
            raise StoreError(f"cannot read {pointer_url}: {exc}") from exc
        version = _parse_pointer(raw, pointer_url)
        if not is_complete(self._version_folder(product, version)):
            raise ModelNotFoundError(
                f"LATEST of product {product!r} in {self._root} points to version {version!r}, "
                "which is missing or incomplete; republish or point LATEST at another version"
            )
        return version

    def versions(self, product: str) -> list[VersionInfo]:
        """List complete versions, newest first (by commit time, then name).

        Returns:
            One :class:`VersionInfo` per complete version; ``[]`` when there is none.
        """
        models_url = self.models_url(product)
        fs, models_path = url_to_fs(models_url)
        names = complete_version_names(models_url)
        if not names:
            return []
        latest = self._read_pointer_quietly(product)
        candidates = self.candidates(product)
        manifest_paths = [f"{models_path}/{n}/{MANIFEST_NAME}" for n in names]
        marker_paths = [f"{models_path}/{n}/{COMPLETE_MARKER}" for n in names]
        contents = fs.cat(manifest_paths + marker_paths, on_error="return")
        dated = [
            self._version_info(product, name, contents.get(mp), contents.get(cp), latest)
            for name, mp, cp in zip(names, manifest_paths, marker_paths, strict=True)
        ]
        dated.sort(key=lambda pair: (pair[0], pair[1].version), reverse=True)
        # A version LATEST names is in use, whatever CANDIDATES still says (e.g. after set_latest).
        return [replace(info, candidate=None if info.is_latest else candidates.get(info.version)) for _, info in dated]

    def candidates(self, product: str) -> dict[str, dict[str, Any]]:
        """The product's candidates: versions published but not (yet) promoted to ``LATEST``.

        Returns:
            ``{version: {"reason": ..., "added_at": ...}}``; ``{}`` when there is none.

        Raises:
            StoreError: ``CANDIDATES`` exists but cannot be read or is not valid JSON.
        """
        url = join_url(self.models_url(product), CANDIDATES_FILE)
        try:
            raw = read_bytes(url)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreError(f"cannot read {url}: {exc}") from exc
        payload = loads_or_empty(raw)
        entries = payload.get("candidates")
        if not isinstance(entries, dict):
            raise StoreError(f'{url} is corrupt: expected {{"candidates": {{version: ...}}}}')
        return {str(k): dict(v) if isinstance(v, dict) else {} for k, v in entries.items()}

    def products(self) -> list[str]:
        """List products with at least one published model (a ``LATEST`` pointer), sorted."""
        fs, root_path = url_to_fs(self._root)
        fs.invalidate_cache(root_path)
        try:
            entries = fs.ls(root_path, detail=True)
        except FileNotFoundError:
            return []
        names = sorted(
            entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "directory"
        )
        valid = [n for n in names if PRODUCT_NAME_PATTERN.fullmatch(n) and ".." not in n]
        return [n for n in valid if fs.exists(f"{root_path.rstrip('/')}/{n}/{MODELS_DIR}/{LATEST_POINTER}")]

    def read_manifest(self, product: str, version: str) -> dict[str, Any]:
        """Read the manifest of a complete version.

        Raises:
            ModelNotFoundError: The version does not exist or is not complete.
            ModelIntegrityError: The manifest is missing or not valid JSON.
        """
        url = self.version_url(product, version)
        check_manifest_digest(url)
        return read_folder_manifest(url)

    def verify(self, product: str, version: str) -> dict[str, Any]:
        """Re-check every file of a complete version against its manifest (sizes and sha256).

        Returns:
            The manifest.

        Raises:
            ModelNotFoundError: The version does not exist or is not complete.
            ModelIntegrityError: A file is missing, truncated or altered.
        """
        url = self.version_url(product, version)
        check_manifest_digest(url)
        return verify_folder(url)

    # ---- writing ------------------------------------------------------------------------------

    def publish(
        self, product: str, write: WriteCallback, version: str | None = None, *, promote: bool = True, reason: str = ""
    ) -> str:
        """Publish a new model version atomically and move ``LATEST`` to it (or record a candidate).

        ``write(url)`` must write every file of the model under the folder URL it is given (via
        fsspec) and finally ``manifest.json`` with ``"files": {name: {"sha256", "size"}}`` for
        every other file (see :func:`~padim.io.manifest.write_manifest`). The files are then read back and checked;
        only then is the version committed (local: rename of the staging folder; S3: the
        ``_COMPLETE`` marker) and ``LATEST`` moved. If anything fails, the partial version is
        removed (best effort), stays invisible to readers, and ``LATEST`` does not move.

        Args:
            product: Product name (validated).
            write: Callback writing the model files into the folder URL it receives.
            version: Explicit version name; default :func:`~padim.io.store_layout.new_version`.
            promote: Move ``LATEST`` to the new version. ``False`` publishes a *candidate*:
                complete and listed, recorded in ``CANDIDATES``, not used by scoring until
                :meth:`promote`.
            reason: Why a candidate was not promoted yet (recorded in ``CANDIDATES``).

        Returns:
            The published version name.

        Raises:
            InvalidProductNameError: Invalid product name.
            ConfigError: Invalid explicit version name.
            ModelIntegrityError: The written files do not match the manifest.
            StoreError: ``write`` raised (the cause is chained), or the version already exists,
                or the store cannot be written.
        """
        validate_product(product)
        explicit = version is not None
        if explicit:
            validate_version(version)  # type: ignore[arg-type]
        models_url = self.models_url(product)
        if is_local(self._root):
            published = publish_local(models_url, product, write, version, store_root=self._root)
        else:
            published = publish_remote(models_url, product, write, version, explicit=explicit, store_root=self._root)
        if promote:
            self._set_pointer(product, published)
            logger.info("published %s version %s to %s", product, published, self._root)
        else:
            self.mark_candidate(product, published, reason or "awaiting the promotion gate")
            logger.info("published %s version %s to %s as a candidate", product, published, self._root)
        return published

    def mark_candidate(self, product: str, version: str, reason: str) -> None:
        """Record (or update) why a complete version is a candidate, not the one in use.

        Args:
            product: Product name.
            version: A complete version.
            reason: Why it is not in use (shown by ``padim models``).

        Raises:
            ModelNotFoundError: The version does not exist or is not complete.
            ConfigError: The version is the one in use.
        """
        self.version_url(product, version)
        if self._read_pointer_quietly(product) == version:
            raise ConfigError(f"version {version} of {product!r} is the one in use, not a candidate")
        entries = self.candidates(product)
        entries[version] = {"reason": reason, "added_at": entries.get(version, {}).get("added_at") or utc_now_iso()}
        self._write_candidates(product, entries)

    def promote(self, product: str, version: str) -> str | None:
        """Make a complete version (a candidate, or an older version) the one scoring uses.

        Args:
            product: Product name.
            version: The version to use.

        Returns:
            The version in use before (``None`` if there was none).

        Raises:
            ModelNotFoundError: The version does not exist or is not complete.
        """
        previous = self._read_pointer_quietly(product)
        self.set_latest(product, version)
        entries = self.candidates(product)
        if entries.pop(version, None) is not None:
            self._write_candidates(product, entries)
        logger.info("promoted %s version %s (was %s)", product, version, previous)
        return previous

    def prune(self, product: str, keep: int) -> list[str]:
        """Remove old versions, keeping the ``keep`` newest, the one in use and every candidate.

        A version is made invisible first (local: its folder is renamed to a hidden staging name;
        object stores: its ``_COMPLETE`` marker is deleted), then its files are removed; an
        interrupted prune leaves only what :meth:`delete_incomplete` removes.

        Args:
            product: Product name.
            keep: Newest versions to keep (at least 1); the version in use and the candidates
                are kept in addition when they are older.

        Returns:
            The removed versions, newest first.

        Raises:
            ValueError: ``keep`` is below 1.
            ModelNotFoundError: The product has no version in use (nothing is removed then).
        """
        if keep < 1:
            raise ValueError(f"keep must be at least 1 (the version in use is always kept), got {keep}")
        in_use = self.latest(product)
        versions = self.versions(product)
        removable = [v.version for v in versions[keep:] if v.version != in_use and not v.is_candidate]
        for name in removable:
            remove_version(self.models_url(product), name, local=is_local(self._root))
        if removable:
            logger.info("pruned %d version(s) of %s: %s", len(removable), product, ", ".join(removable))
        return removable

    def set_latest(self, product: str, version: str) -> None:
        """Point ``LATEST`` at an existing complete version (promotion or rollback).

        Raises:
            ModelNotFoundError: The version does not exist or is not complete.
        """
        self.version_url(product, version)
        self._set_pointer(product, version)

    def delete_incomplete(self, product: str, older_than_hours: float = 24.0) -> list[str]:
        """Remove leftovers of interrupted publishes older than a threshold.

        Locally these are ``.staging-*`` folders; on object stores, version prefixes without a
        ``_COMPLETE`` marker. A local version folder without the marker is never deleted (the
        store never creates one: it may be a hand-made copy).

        Args:
            product: Product name.
            older_than_hours: Only remove leftovers whose newest file is older than this.

        Returns:
            URLs of the removed folders.
        """
        return remove_leftovers(self.models_url(product), local=is_local(self._root), older_than_hours=older_than_hours)

    # ---- internals ----------------------------------------------------------------------------

    def _write_candidates(self, product: str, entries: Mapping[str, Any]) -> None:
        """Atomically rewrite ``CANDIDATES``."""
        payload = {"product": product, "candidates": dict(sorted(entries.items())), "updated_at": utc_now_iso()}
        url = join_url(self.models_url(product), CANDIDATES_FILE)
        try:
            write_bytes_atomic(url, to_json_bytes(payload))
        except OSError as exc:
            raise StoreError(f"cannot write {url}: {exc}") from exc

    def _version_folder(self, product: str, version: str) -> str:
        """URL of a version folder (no existence check)."""
        return join_url(self.models_url(product), validate_version(version))

    def _version_info(
        self,
        product: str,
        version: str,
        manifest_raw: bytes | Exception | None,
        marker_raw: bytes | Exception | None,
        latest: str | None,
    ) -> tuple[str, VersionInfo]:
        """Build ``(commit time, VersionInfo)`` from the raw manifest and marker contents."""
        manifest = loads_or_empty(manifest_raw)
        marker = loads_or_empty(marker_raw)
        files = manifest.get("files")
        entries = files.values() if isinstance(files, dict) else ()
        size = sum(e["size"] for e in entries if isinstance(e, dict) and isinstance(e.get("size"), int))
        committed = str(marker.get("completed_at", ""))
        created = manifest.get("created_at") or committed or None
        info = VersionInfo(
            product=product,
            version=version,
            url=self._version_folder(product, version),
            created_at=str(created) if created is not None else None,
            summary={k: v for k, v in manifest.items() if k != "files"},
            is_latest=version == latest,
            size_bytes=size,
        )
        return committed, info

    def _read_pointer_quietly(self, product: str) -> str | None:
        """The version named by ``LATEST``, or None when absent or unreadable."""
        try:
            return _parse_pointer(read_bytes(join_url(self.models_url(product), LATEST_POINTER)), "")
        except (OSError, StoreError, ConfigError):
            return None

    def _set_pointer(self, product: str, version: str) -> None:
        """Atomically rewrite ``LATEST``."""
        payload = {"product": product, "version": version, "updated_at": utc_now_iso()}
        pointer_url = join_url(self.models_url(product), LATEST_POINTER)
        try:
            write_bytes_atomic(pointer_url, to_json_bytes(payload))
        except OSError as exc:
            raise StoreError(
                f"version {version} of {product!r} is stored but LATEST could not be updated: {exc}"
            ) from exc


def _parse_pointer(raw: bytes, pointer_url: str) -> str:
    """Read a ``LATEST`` pointer: JSON ``{"version": ...}`` or, if hand-edited, a bare name."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        payload = text
    version = payload.get("version") if isinstance(payload, dict) else payload
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version) or ".." in version:
        raise StoreError(f"LATEST pointer {pointer_url} is corrupt: {text[:80]!r}")
    return version
