"""Parameter checks shared by the flows: every bad input fails before any work starts."""

from __future__ import annotations

import os
from datetime import date, datetime, timezone

from fsspec import AbstractFileSystem

from padim.core.config import PadimConfig
from padim.errors import ConfigError
from padim.io.fsio import url_to_fs
from padim.io.store import ModelStore
from padim.io.store_layout import default_store_url, validate_product
from padim.settings import default_of


def resolve_url(url: str, what: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem and path of a URL, or a clear error for an unusable one.

    Args:
        url: Local path or fsspec URL.
        what: What the URL is, for the message.

    Returns:
        ``(fs, path)``.

    Raises:
        ConfigError: For an empty URL, an unknown protocol or one whose fsspec package is missing.
    """
    if not url or not url.strip():
        raise ConfigError(f"no {what} given (an empty path would mean the current directory)")
    scheme, separator, rest = url.partition("://")
    if separator and scheme.lower() not in ("file", "local") and not rest.split("/", 1)[0].strip():
        raise ConfigError(f"{what} {url!r} names no bucket: write {scheme}://<bucket>/<prefix>")
    try:
        return url_to_fs(url)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"{what} {url!r} is not a usable path or URL: {exc}") from exc


def check_outside_store(url: str, store: ModelStore, what: str) -> str:
    """Refuse an input folder that is the model store or lies inside it.

    Scoring the store's own heat maps, or training on them, is never what was meant (an empty
    ``--images`` run where the store lives did exactly that).

    Args:
        url: The input folder.
        store: The model store.
        what: What the folder is, for the message.

    Returns:
        The URL.

    Raises:
        ConfigError: If the folder is the store or inside it.
    """
    folder, root = _comparable(url), _comparable(store.root)
    if folder == root or folder.startswith(root.rstrip("/") + "/"):
        raise ConfigError(f"{what} folder {url} is inside the model store {store.root}; give the folder of the images")
    return url


def _comparable(url: str) -> str:
    """A URL in a form where containment is a prefix test (local: real path; remote: protocol + path)."""
    fs, path = url_to_fs(url)
    if "://" not in url or url.lower().startswith(("file://", "local://")):
        return os.path.realpath(path)
    return fs.unstrip_protocol(path).rstrip("/")


def open_store(store: str | None) -> ModelStore:
    """The model store at ``store`` (default ``$PADIM_STORE`` or ``./padim-store``).

    Raises:
        ConfigError: If the store URL is unusable (unknown protocol).
    """
    model_store = ModelStore(store or default_store_url())
    resolve_url(model_store.root, "store")
    return model_store


def check_product(product: str) -> str:
    """Validate a product name (raises InvalidProductNameError)."""
    return validate_product(product)


def check_folder(url: str, what: str) -> str:
    """Check that an input folder exists.

    Args:
        url: Local path or ``s3://`` URL.
        what: What the folder is, for the message.

    Returns:
        The URL.

    Raises:
        ConfigError: If it is not given, not a usable URL, does not exist or is not a folder.
    """
    fs, path = resolve_url(url, f"{what} folder")
    if not fs.isdir(path):
        if fs.exists(path):
            raise ConfigError(f"{what} folder {url} is a file, not a folder")
        raise ConfigError(f"{what} folder not found: {url}")
    return url


def parse_day(value: str | date | None) -> date:
    """Production date of a run: the given ``YYYY-MM-DD`` or today (UTC).

    Raises:
        ConfigError: For a malformed date.
    """
    if value is None or value == "":
        return datetime.now(timezone.utc).date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"date must look like YYYY-MM-DD, got {value!r}") from exc


def build_config(
    backbone: str = default_of(PadimConfig, "backbone"),
    weights: str | None = None,
    channels: int | None = None,
    image_size: int | None = None,
    crop_size: int | None = None,
    **extra: object,
) -> PadimConfig:
    """A validated model configuration from flat parameters (defaults from :class:`PadimConfig`).

    Args:
        backbone: Backbone name.
        weights: Weights file URL or ``"random"``.
        channels: Embedding dimension (``None``: the backbone's default).
        image_size: Resize side (``None``: the configuration's default).
        crop_size: Centre-crop side (``None``: no crop).
        **extra: Further :class:`PadimConfig` fields.

    Returns:
        The configuration.

    Raises:
        ConfigError: For invalid values.
    """
    values: dict[str, object] = {"backbone": backbone, "weights": weights, "channels": channels, **extra}
    if image_size is not None:
        values["image_size"] = image_size
    values["crop_size"] = crop_size
    try:
        return PadimConfig(**values)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"invalid model options: {exc}") from exc
