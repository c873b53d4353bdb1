"""The model store's layout: its root URL, product and version names, and its fixed file names.

Under a store root URL (``$PADIM_STORE`` or ``./padim-store`` by default)::

    <root>/<product>/models/<version>/manifest.json   # {"files": {name: {"sha256", "size"}}, ...}
    <root>/<product>/models/<version>/_COMPLETE       # written last, after verification
    <root>/<product>/models/LATEST                    # {"version": ...}
    <root>/<product>/models/CANDIDATES                # {"candidates": {version: {...}}}

Product and version names become path segments and object-key components, so they are checked
here (:func:`validate_product`, :func:`validate_version`) before any URL is built from them.
Generated versions are ``vYYYYMMDDTHHMMSSZ-xxxxxx`` (:func:`new_version`). The store itself is
:class:`padim.io.store.ModelStore`.
"""

from __future__ import annotations

import os
import re
import secrets
from datetime import datetime, timezone

from padim.errors import ConfigError, InvalidProductNameError

__all__ = [
    "CANDIDATES_FILE",
    "COMPLETE_MARKER",
    "DEFAULT_STORE_DIR",
    "LATEST_POINTER",
    "MANIFEST_NAME",
    "MODELS_DIR",
    "PRODUCT_NAME_PATTERN",
    "STAGING_PREFIX",
    "STORE_ENV_VAR",
    "VERSION_PATTERN",
    "default_store_url",
    "new_version",
    "normalise_root",
    "store_root_of",
    "validate_product",
    "validate_version",
]

STORE_ENV_VAR = "PADIM_STORE"
DEFAULT_STORE_DIR = "padim-store"
MODELS_DIR = "models"
MANIFEST_NAME = "manifest.json"
COMPLETE_MARKER = "_COMPLETE"
LATEST_POINTER = "LATEST"
CANDIDATES_FILE = "CANDIDATES"
STAGING_PREFIX = ".staging-"
PRODUCT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_store_url() -> str:
    """Return the store root: ``$PADIM_STORE`` if set, else ``./padim-store`` (made absolute).

    Returns:
        A URL; local paths are absolute.
    """
    configured = os.environ.get(STORE_ENV_VAR, "").strip()
    return normalise_root(configured or DEFAULT_STORE_DIR)


def normalise_root(root: str) -> str:
    """Make a local store root absolute and drop trailing slashes.

    Args:
        root: Local path or URL of a store root.

    Returns:
        The root; local paths are absolute.

    Raises:
        ConfigError: The root is empty.
    """
    root = os.fspath(root).strip()
    if not root:
        raise ConfigError("model store root is empty; set PADIM_STORE or pass a folder or s3:// URL")
    if "://" not in root:
        return os.path.abspath(os.path.expanduser(root))
    stripped = root.rstrip("/")
    return stripped if not stripped.endswith(":/") else root


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
