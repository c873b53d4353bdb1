"""Versioned per-product model store over fsspec (local disk or S3), with atomic publishing.

Layout under a store root URL (``$PADIM_STORE`` or ``./padim-store`` by default)::

    <root>/<product>/models/<version>/manifest.json   # {"files": {name: {"sha256", "size"}}, ...}
    <root>/<product>/models/<version>/_COMPLETE       # written last, after verification
    <root>/<product>/models/<version>/<model files>
    <root>/<product>/models/LATEST                    # {"version": ...}, moved after _COMPLETE
    <root>/<product>/models/CANDIDATES                # {"candidates": {version: {...}}}: not yet in use
    <root>/<product>/<other artifacts>                # see ModelStore.artifact_url

Versions are ``vYYYYMMDDTHHMMSSZ-xxxxxx``: the UTC publish time plus 6 random hex digits, so
concurrent publishers never collide and generated names sort by time. A version is visible to
readers only once its ``_COMPLETE`` marker exists; the marker is written only after every file
listed in ``manifest.json`` has been read back and matched its size and sha256. Locally the whole
version is built in a hidden ``.staging-<version>-<rand>`` folder and renamed into place; on S3
(no rename) it is written under its final prefix and the marker is the commit. ``LATEST`` moves
(one atomic write) only after the version is committed. A version published with
``promote=False`` (a retrain awaiting the promotion gate) is recorded in ``CANDIDATES`` instead;
:meth:`ModelStore.promote` moves ``LATEST`` to it later. :meth:`ModelStore.prune` removes old
versions but never the one in use or a candidate. Details in ``docs/storage.md``.

A manifest is data, not an instruction: whoever can write the store could also rewrite a manifest
and re-seal its marker. So a model loaded for scoring (or as the base of a refit) may name as its
backbone weights only the default ones, ``"random"``, or a file inside the store or inside a
location the operator listed in ``$PADIM_WEIGHTS_ALLOW`` (:func:`check_manifest_weights`); the
file must then also have the sha256 the model recorded (checked before it is parsed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from padim.errors import (
    ConfigError,
    InvalidProductNameError,
    ModelIntegrityError,
    ModelNotFoundError,
    StoreError,
    WeightsNotAllowedError,
)
from padim.fsio import (
    fsync_dir,
    is_local,
    join_url,
    protocol_of,
    read_bytes,
    sha256_of,
    url_to_fs,
    write_bytes_atomic,
)

__all__ = [
    "CANDIDATES_FILE",
    "COMPLETE_MARKER",
    "LATEST_POINTER",
    "MANIFEST_NAME",
    "MODELS_DIR",
    "PRODUCT_NAME_PATTERN",
    "STORE_ENV_VAR",
    "WEIGHTS_ALLOW_ENV_VAR",
    "ModelStore",
    "VersionInfo",
    "allowed_weights_roots",
    "check_manifest_weights",
    "default_store_url",
    "describe_files",
    "new_version",
    "store_root_of",
    "validate_product",
    "validate_version",
    "write_manifest",
]

logger = logging.getLogger(__name__)

STORE_ENV_VAR = "PADIM_STORE"
WEIGHTS_ALLOW_ENV_VAR = "PADIM_WEIGHTS_ALLOW"
_RANDOM_WEIGHTS = "random"  # padim.backbones.RANDOM_WEIGHTS (not imported here: that loads torch)
DEFAULT_STORE_DIR = "padim-store"
MODELS_DIR = "models"
MANIFEST_NAME = "manifest.json"
COMPLETE_MARKER = "_COMPLETE"
LATEST_POINTER = "LATEST"
CANDIDATES_FILE = "CANDIDATES"
STAGING_PREFIX = ".staging-"
PRODUCT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RESERVED_NAMES = frozenset({MANIFEST_NAME, COMPLETE_MARKER})
_MAX_VERSION_ATTEMPTS = 5

WriteCallback = Callable[[str], None]
"""Writes every file of a model into the folder URL it is given, ``manifest.json`` last."""


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def default_store_url() -> str:
    """Return the store root: ``$PADIM_STORE`` if set, else ``./padim-store`` (made absolute).

    Returns:
        A URL; local paths are absolute.
    """
    configured = os.environ.get(STORE_ENV_VAR, "").strip()
    return _normalise_root(configured or DEFAULT_STORE_DIR)


def validate_product(name: str) -> str:
    """Check that a product name is a safe single path segment and object-key component.

    Args:
        name: Candidate product name.

    Returns:
        The name, unchanged.

    Raises:
        InvalidProductNameError: The name is empty, too long, has upper-case letters, a slash,
            ``..`` or another character outside ``[a-z0-9._-]``, or does not start with a letter or
            digit.
    """
    if not isinstance(name, str) or not name:
        raise InvalidProductNameError("product name is empty; use e.g. 'bottle' or 'tile-2'")
    if ".." in name or not PRODUCT_NAME_PATTERN.fullmatch(name):
        raise InvalidProductNameError(
            f"invalid product name {name!r}: use 1-64 characters from lower-case letters, digits, "
            "'.', '_' and '-', starting with a letter or digit, without '..' (e.g. 'bottle', 'tile-2')"
        )
    return name


def validate_version(version: str) -> str:
    """Check that a version name is a safe single path segment.

    Args:
        version: Candidate version name.

    Returns:
        The version, unchanged.

    Raises:
        ConfigError: The version is empty, starts with a non-alphanumeric character, contains
            characters outside ``[A-Za-z0-9._-]`` or ``..``, or is longer than 128 characters.
    """
    if not isinstance(version, str) or ".." in version or not VERSION_PATTERN.fullmatch(version):
        raise ConfigError(
            f"invalid model version {version!r}: use 1-128 characters from letters, digits, '.', "
            "'_' and '-', starting with a letter or digit, without '..'"
        )
    return version


def new_version(now: datetime | None = None) -> str:
    """Generate a version name: UTC timestamp plus a random suffix.

    Args:
        now: Time to encode (default: the current time).

    Returns:
        For example ``"v20261126T013953Z-3fa2c1"``; later times sort later as strings.
    """
    moment = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return f"{moment:v%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------


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
            are what :meth:`ModelStore.versions` reports. ``created_at`` is added if missing.
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
    manifest.setdefault("created_at", _utc_now_iso())
    manifest["files"] = entries
    write_bytes_atomic(join_url(dir_url, MANIFEST_NAME), _to_json(manifest))
    return manifest


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


def _to_json(payload: Mapping[str, Any]) -> bytes:
    """Serialise a small JSON document."""
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _utc_now_iso() -> str:
    """Current UTC time, ISO 8601 with microseconds (sortable as a string)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _normalise_root(root: str) -> str:
    """Make a local root absolute and drop trailing slashes."""
    root = os.fspath(root).strip()
    if not root:
        raise ConfigError("model store root is empty; set PADIM_STORE or pass a folder or s3:// URL")
    if "://" not in root:
        return os.path.abspath(os.path.expanduser(root))
    stripped = root.rstrip("/")
    return stripped if not stripped.endswith(":/") else root


# --------------------------------------------------------------------------------------------
# Backbone weights a manifest may name
# --------------------------------------------------------------------------------------------


def store_root_of(version_url: str) -> str:
    """The store root a version folder belongs to.

    Args:
        version_url: A folder ``<root>/<product>/models/<version>``, or any other model folder.

    Returns:
        ``<root>`` when the folder follows the store layout, else ``version_url`` itself (a model
        outside a store may only use weights inside its own folder).
    """
    parts = version_url.rstrip("/").split("/")
    in_layout = (
        len(parts) >= 4
        and parts[-2] == MODELS_DIR
        and PRODUCT_NAME_PATTERN.fullmatch(parts[-3]) is not None
        and VERSION_PATTERN.fullmatch(parts[-1]) is not None
    )
    root = "/".join(parts[:-3]) if in_layout else ""
    return root if root and not root.endswith(":/") else version_url


def allowed_weights_roots(store_root: str | None = None) -> list[str]:
    """Locations a model manifest may name as its backbone weights file.

    Args:
        store_root: The store (or model folder) the manifest belongs to; ``None`` for none.

    Returns:
        ``store_root`` (when given), then each comma-separated entry of ``$PADIM_WEIGHTS_ALLOW``:
        local folders or files (``/models/weights``) and URL prefixes (``s3://models/weights``).
    """
    configured = [entry.strip() for entry in os.environ.get(WEIGHTS_ALLOW_ENV_VAR, "").split(",")]
    return [*([store_root] if store_root else []), *(entry for entry in configured if entry)]


def check_manifest_weights(weights: str | None, version_url: str) -> None:
    """Refuse backbone weights a model manifest may not name, before anything is opened.

    The rule: a model loaded from a manifest (scoring, the base of a refit) may use

    * ``None``: the built-in default weights (the packaged EfficientNet-Lite0 file, torchvision's
      cache for ResNets), checked against the registry's sha256;
    * ``"random"``: seeded random weights (tests);
    * a local path or URL inside the store the version belongs to, or inside an entry of
      ``$PADIM_WEIGHTS_ALLOW`` (comma-separated folders and URL prefixes). Local paths are
      compared after resolving ``..`` and symbolic links; URLs must share the protocol and the
      prefix up to a ``/`` and may not contain ``..`` segments or ``::`` chains.

    Anything else (``/etc/hostname``, ``s3://other-bucket/x.pth``) is refused here. Weights given
    to training explicitly (``padim train --weights``) are the operator's choice and are not
    checked; the model's ``weights_sha256`` is checked when the file is loaded
    (:func:`padim.backbones.get_backbone`).

    Args:
        weights: ``weights`` of the manifest's configuration.
        version_url: The model version folder the manifest was read from.

    Raises:
        WeightsNotAllowedError: The manifest names weights outside the allowed locations.
    """
    if weights is None or weights == _RANDOM_WEIGHTS:
        return
    store_root = store_root_of(version_url)
    if any(_is_within(weights, root) for root in allowed_weights_roots(store_root)):
        return
    configured = os.environ.get(WEIGHTS_ALLOW_ENV_VAR, "").strip() or "unset"
    raise WeightsNotAllowedError(
        f"model manifest {join_url(version_url, MANIFEST_NAME)} names backbone weights {weights!r} outside "
        f"the store {store_root} and {WEIGHTS_ALLOW_ENV_VAR} ({configured}); refused without opening it "
        f"(add the file's folder or URL prefix to {WEIGHTS_ALLOW_ENV_VAR} if you trust it)"
    )


def _weights_location(url: str) -> tuple[str, str] | None:
    """``(protocol, comparable location)`` of a weights URL, or None for one that is never allowed.

    Local paths are made absolute with ``..`` and symbolic links resolved (no file is opened);
    remote URLs are kept as written, without the protocol.
    """
    if "\x00" in url:
        return None
    if is_local(url):
        _, path = url_to_fs(url)
        return "file", os.path.realpath(path)
    rest = url.partition("://")[2]
    if not rest or "::" in url or any(part in (".", "..") for part in rest.split("/")):
        return None
    return protocol_of(url), rest


def _is_within(candidate: str, root: str) -> bool:
    """True when ``candidate`` is ``root`` itself or lies below it (same protocol)."""
    found, base = _weights_location(candidate), _weights_location(root)
    if found is None or base is None or found[0] != base[0]:
        return False
    separator = os.sep if found[0] == "file" else "/"
    return found[1] == base[1] or found[1].startswith(base[1].rstrip(separator) + separator)


# --------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------


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
            :func:`default_store_url`.
    """

    def __init__(self, root: str | None = None) -> None:
        self._root = _normalise_root(root) if root is not None else default_store_url()

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
        if not self._is_complete(url):
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
        if not self._is_complete(self._version_folder(product, version)):
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
        names = self._complete_version_names(models_url)
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
        payload = _loads_or_empty(raw)
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
        _check_manifest_digest(url)
        return _read_manifest(url)

    def verify(self, product: str, version: str) -> dict[str, Any]:
        """Re-check every file of a complete version against its manifest (sizes and sha256).

        Returns:
            The manifest.

        Raises:
            ModelNotFoundError: The version does not exist or is not complete.
            ModelIntegrityError: A file is missing, truncated or altered.
        """
        url = self.version_url(product, version)
        _check_manifest_digest(url)
        return _verify_folder(url)

    # ---- writing ------------------------------------------------------------------------------

    def publish(
        self, product: str, write: WriteCallback, version: str | None = None, *, promote: bool = True, reason: str = ""
    ) -> str:
        """Publish a new model version atomically and move ``LATEST`` to it (or record a candidate).

        ``write(url)`` must write every file of the model under the folder URL it is given (via
        fsspec) and finally ``manifest.json`` with ``"files": {name: {"sha256", "size"}}`` for
        every other file (see :func:`write_manifest`). The files are then read back and checked;
        only then is the version committed (local: rename of the staging folder; S3: the
        ``_COMPLETE`` marker) and ``LATEST`` moved. If anything fails, the partial version is
        removed (best effort), stays invisible to readers, and ``LATEST`` does not move.

        Args:
            product: Product name (validated).
            write: Callback writing the model files into the folder URL it receives.
            version: Explicit version name; default :func:`new_version`.
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
        if is_local(self._root):
            published = self._publish_local(product, write, version)
        else:
            published = self._publish_remote(product, write, version, explicit)
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
        entries[version] = {"reason": reason, "added_at": entries.get(version, {}).get("added_at") or _utc_now_iso()}
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
            self._remove_version(product, name)
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
        models_url = self.models_url(product)
        fs, models_path = url_to_fs(models_url)
        fs.invalidate_cache(models_path)
        try:
            entries = fs.ls(models_path, detail=True)
        except FileNotFoundError:
            return []
        local = is_local(self._root)
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
                else (bool(VERSION_PATTERN.fullmatch(name)) and not self._is_complete(url))
            )
            if leftover and _newest_mtime(fs, entry["name"]) < cutoff:
                fs.rm(entry["name"], recursive=True)
                removed.append(url)
        return removed

    # ---- internals ----------------------------------------------------------------------------

    def _write_candidates(self, product: str, entries: Mapping[str, Any]) -> None:
        """Atomically rewrite ``CANDIDATES``."""
        payload = {"product": product, "candidates": dict(sorted(entries.items())), "updated_at": _utc_now_iso()}
        url = join_url(self.models_url(product), CANDIDATES_FILE)
        try:
            write_bytes_atomic(url, _to_json(payload))
        except OSError as exc:
            raise StoreError(f"cannot write {url}: {exc}") from exc

    def _remove_version(self, product: str, version: str) -> None:
        """Make a version invisible, then delete its files."""
        url = self._version_folder(product, version)
        fs, path = url_to_fs(url)
        if is_local(self._root):
            hidden = os.path.join(os.path.dirname(path), f"{STAGING_PREFIX}pruned-{version}-{secrets.token_hex(4)}")
            os.rename(path, hidden)
            fsync_dir(os.path.dirname(path))
            shutil.rmtree(hidden, ignore_errors=True)
            return
        fs.rm(f"{path}/{COMPLETE_MARKER}")
        fs.rm(path, recursive=True)

    def _version_folder(self, product: str, version: str) -> str:
        """URL of a version folder (no existence check)."""
        return join_url(self.models_url(product), validate_version(version))

    def _is_complete(self, version_url: str) -> bool:
        """True when the version's ``_COMPLETE`` marker exists."""
        return _file_exists(join_url(version_url, COMPLETE_MARKER))

    def _complete_version_names(self, models_url: str) -> list[str]:
        """Names of version folders that hold a ``_COMPLETE`` marker (one listing)."""
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

    def _version_info(
        self,
        product: str,
        version: str,
        manifest_raw: bytes | Exception | None,
        marker_raw: bytes | Exception | None,
        latest: str | None,
    ) -> tuple[str, VersionInfo]:
        """Build ``(commit time, VersionInfo)`` from the raw manifest and marker contents."""
        manifest = _loads_or_empty(manifest_raw)
        marker = _loads_or_empty(marker_raw)
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
        payload = {"product": product, "version": version, "updated_at": _utc_now_iso()}
        pointer_url = join_url(self.models_url(product), LATEST_POINTER)
        try:
            write_bytes_atomic(pointer_url, _to_json(payload))
        except OSError as exc:
            raise StoreError(
                f"version {version} of {product!r} is stored but LATEST could not be updated: {exc}"
            ) from exc

    def _publish_local(self, product: str, write: WriteCallback, version: str | None) -> str:
        """Stage in a hidden folder, verify, mark complete, rename into place."""
        models_url = self.models_url(product)
        _, models_path = url_to_fs(models_url)
        version = version or new_version()
        final_path = os.path.join(models_path, version)
        staging_name = f"{STAGING_PREFIX}{version}-{secrets.token_hex(4)}"
        staging_path = os.path.join(models_path, staging_name)
        try:
            os.makedirs(models_path, exist_ok=True)
            if os.path.exists(final_path):
                raise StoreError(f"version {version} of {product!r} already exists in {self._root}")
            os.mkdir(staging_path)
        except OSError as exc:
            raise StoreError(f"cannot create {staging_path}: {exc}") from exc
        staging_url = join_url(models_url, staging_name)
        try:
            self._write_and_verify(product, version, write, staging_url)
            _rename_into_place(staging_path, final_path, product, version)
        except BaseException as exc:
            shutil.rmtree(staging_path, ignore_errors=True)
            _raise_publish_error(exc, product, version)
        fsync_dir(models_path)
        return version

    def _publish_remote(self, product: str, write: WriteCallback, version: str | None, explicit: bool) -> str:
        """Write under the final prefix, verify, then write the ``_COMPLETE`` marker last."""
        models_url = self.models_url(product)
        fs, _ = url_to_fs(models_url)
        version_url, version = self._claim_remote_version(product, version, explicit)
        _, version_path = url_to_fs(version_url)
        try:
            self._write_and_verify(product, version, write, version_url)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                fs.rm(version_path, recursive=True)
            _raise_publish_error(exc, product, version)
        return version

    def _claim_remote_version(self, product: str, version: str | None, explicit: bool) -> tuple[str, str]:
        """Pick a version whose prefix is still empty on the object store."""
        for _ in range(_MAX_VERSION_ATTEMPTS):
            candidate = version or new_version()
            url = self._version_folder(product, candidate)
            fs, path = url_to_fs(url)
            fs.invalidate_cache(path)
            if not fs.exists(path):
                return url, candidate
            if explicit:
                raise StoreError(f"version {candidate} of {product!r} already exists in {self._root}")
        raise StoreError(f"could not find a free version name for {product!r} in {self._root}")

    def _write_and_verify(self, product: str, version: str, write: WriteCallback, folder_url: str) -> None:
        """Run the caller's write, verify the folder, then write the ``_COMPLETE`` marker."""
        write(folder_url)
        if _file_exists(join_url(folder_url, COMPLETE_MARKER)):
            raise ModelIntegrityError(
                f"the model writer created {COMPLETE_MARKER} in {folder_url}; only the store may write it"
            )
        manifest = _verify_folder(folder_url)
        marker = {
            "product": product,
            "version": version,
            "completed_at": _utc_now_iso(),
            "files": sorted([*manifest["files"], MANIFEST_NAME]),
            # manifest.json holds the other files' checksums; the marker holds the manifest's.
            "manifest_sha256": sha256_of(join_url(folder_url, MANIFEST_NAME))[0],
        }
        write_bytes_atomic(join_url(folder_url, COMPLETE_MARKER), _to_json(marker))


# --------------------------------------------------------------------------------------------
# Module helpers
# --------------------------------------------------------------------------------------------


def _file_exists(url: str) -> bool:
    """True when a file exists (fresh listing on object stores)."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    return bool(fs.isfile(path))


def _read_manifest(folder_url: str) -> dict[str, Any]:
    """Read and parse ``manifest.json`` of a folder."""
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


def _check_manifest_digest(folder_url: str) -> None:
    """Check ``manifest.json`` against the sha256 its ``_COMPLETE`` marker recorded at publishing.

    Versions committed before the marker recorded it are accepted as they are.

    Raises:
        ModelIntegrityError: The manifest was altered (or replaced) after publishing.
    """
    try:
        marker = _loads_or_empty(read_bytes(join_url(folder_url, COMPLETE_MARKER)))
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


def _verify_folder(folder_url: str) -> dict[str, Any]:
    """Check every file listed in a folder's manifest: present, right size, right sha256."""
    manifest = _read_manifest(folder_url)
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


def _loads_or_empty(raw: bytes | Exception | None) -> dict[str, Any]:
    """Parse JSON bytes into a dict; anything else gives ``{}``."""
    if not isinstance(raw, bytes | bytearray):
        return {}
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


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
