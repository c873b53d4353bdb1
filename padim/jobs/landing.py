"""New batches of normal images in a product's landing folder, announced exactly once each.

A batch is an immediate sub-folder of the landing URL (``landing/2026-11-26/``). A batch counts as
arrived once it holds at least one image and nothing in it changed for ``settle_seconds`` (so a
half-uploaded batch is not announced early). Each announced batch gets a marker
``<store>/<product>/watch/<batch>.json``, written after the announcement.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from padim.errors import ConfigError
from padim.io.fsio import exists, join_url, url_to_fs, write_bytes_atomic
from padim.io.listing import list_images
from padim.io.store import ModelStore
from padim.settings import WatchSettings, default_of


@dataclass(frozen=True)
class LandingBatch:
    """A batch of normal images.

    Attributes:
        name: Sub-folder name.
        url: Sub-folder URL.
        n_images: Images in it.
        newest: Modification time of its newest file (epoch seconds), if known.
    """

    name: str
    url: str
    n_images: int
    newest: float | None


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    return None


def list_batches(landing_url: str) -> list[LandingBatch]:
    """List the batches (sub-folders with images) of a landing folder.

    Args:
        landing_url: Local folder or ``s3://`` prefix.

    Returns:
        Batches sorted by name.

    Raises:
        ConfigError: If the landing folder does not exist.
    """
    fs, root = url_to_fs(landing_url)
    fs.invalidate_cache()
    if not fs.exists(root):
        raise ConfigError(f"landing folder not found: {landing_url}")
    batches = []
    for entry in sorted(fs.ls(root, detail=True), key=lambda e: e["name"]):
        if entry.get("type") != "directory":
            continue
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        url = join_url(landing_url, name)
        uris = list_images(url)
        if not uris:
            continue
        infos = fs.find(entry["name"], detail=True)
        times = [t for t in (_mtime(info) for info in infos.values()) if t is not None]
        batches.append(LandingBatch(name=name, url=url, n_images=len(uris), newest=max(times) if times else None))
    return batches


def marker_url(store: ModelStore, product: str, batch: LandingBatch) -> str:
    """URL of the marker recording that a batch was announced."""
    return store.artifact_url(product, "watch", f"{batch.name}.json")


def new_batches(
    store: ModelStore,
    product: str,
    landing_url: str,
    settle_seconds: float = default_of(WatchSettings, "settle_seconds"),
) -> list[LandingBatch]:
    """Batches that have settled and were not announced yet.

    Args:
        store: Model store (holds the markers).
        product: Product name.
        landing_url: The product's landing folder.
        settle_seconds: Quiet time before a batch counts as complete.

    Returns:
        Batches to announce, sorted by name.
    """
    now = time.time()
    fresh = []
    for batch in list_batches(landing_url):
        if exists(marker_url(store, product, batch)):
            continue
        if batch.newest is not None and now - batch.newest < settle_seconds:
            continue
        fresh.append(batch)
    return fresh


def mark_announced(store: ModelStore, product: str, batch: LandingBatch, event_id: str | None) -> None:
    """Record that a batch was announced.

    Args:
        store: Model store.
        product: Product name.
        batch: The batch.
        event_id: Id of the emitted event, if any.
    """
    record = {
        "batch": batch.name,
        "url": batch.url,
        "n_images": batch.n_images,
        "event_id": event_id,
        "announced_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_bytes_atomic(marker_url(store, product, batch), json.dumps(record).encode())
