"""Small generated images, cheap model options and statistics/event helpers for the flow tests."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

CHEAP_MODEL: dict[str, Any] = {
    "backbone": "resnet18",
    "weights": "random",
    "image_size": 64,
    "crop_size": 56,
    "channels": 16,
    "device": "cpu",
}
"""Train-flow options of a model that fits in well under a second per shard on a CPU."""


@contextmanager
def flow_run_warnings() -> Iterator[list[str]]:
    """Collect the warning lines flow runs log (Prefect's ``prefect.flow_runs`` logger)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                lines.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("prefect.flow_runs")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


# ---- images -------------------------------------------------------------------------------------


def texture(rng: np.random.Generator, size: int = 80) -> np.ndarray:
    """A "normal part": a fixed woven pattern with mild per-image noise.

    Args:
        rng: Random generator of this image's noise.
        size: Side in pixels.

    Returns:
        ``(size, size, 3)`` uint8 RGB.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    base = 110 + 40 * np.sin(x / 3.0) * np.cos(y / 4.0)
    pixels = base[..., None] + np.array([10.0, 0.0, -10.0]) + rng.normal(0.0, 6.0, (size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def add_defect(pixels: np.ndarray, rng: np.random.Generator, side: int = 22) -> np.ndarray:
    """Paint a bright square (a "defect") at a random place.

    Args:
        pixels: ``(H, W, 3)`` uint8 image (not modified).
        rng: Random generator of the position.
        side: Side of the square in pixels.

    Returns:
        A copy with the square.
    """
    out = pixels.copy()
    h, w = out.shape[:2]
    top = int(rng.integers(h // 4, h - side - h // 4 + 1))
    left = int(rng.integers(w // 4, w - side - w // 4 + 1))
    out[top : top + side, left : left + side] = 255
    return out


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG encoding of an RGB array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(
    url: str, n_normal: int, n_defect: int = 0, seed: int = 0, prefix: str = "img", size: int = 80
) -> list[str]:
    """Write normal and defective PNGs into a folder (local path or ``s3://``).

    Args:
        url: Target folder.
        n_normal: Normal images (``<prefix>-normal-NNN.png``).
        n_defect: Images with a bright square (``<prefix>-defect-NNN.png``).
        seed: Seed of the noise (different seeds give different images).
        prefix: File name prefix.
        size: Side in pixels.

    Returns:
        The written URLs, sorted.
    """
    rng = np.random.default_rng(seed)
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    written = []
    for kind, count in (("normal", n_normal), ("defect", n_defect)):
        for i in range(count):
            pixels = texture(rng, size)
            if kind == "defect":
                pixels = add_defect(pixels, rng)
            name = f"{prefix}-{kind}-{i:03d}.png"
            path = f"{root.rstrip('/')}/{name}"
            with fs.open(path, "wb") as handle:
                handle.write(png_bytes(pixels))
            written.append(f"{url.rstrip('/')}/{name}")
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    return sorted(written)


def local_dir(path: Path) -> str:
    """A local folder as a string URL, created if missing."""
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


# ---- statistics ---------------------------------------------------------------------------------


def read_statistics(version_url: str) -> dict[str, torch.Tensor]:
    """The float64 statistics (``n``, ``mean``, ``m2``) in a version's ``statistics.safetensors``.

    Args:
        version_url: Version folder URL (local or ``s3://``).

    Returns:
        The stored tensors, on the CPU.
    """
    from safetensors.torch import load

    from padim.core.statistics import GaussianAccumulator
    from padim.io.artifact import STATISTICS_FILE
    from padim.io.fsio import join_url, read_bytes

    raw = load(read_bytes(join_url(version_url, STATISTICS_FILE)))
    stored = raw.get("m2_packed", raw.get("m2"))
    if raw["mean"].dtype != torch.float64 or stored is None or stored.dtype != torch.float64:
        raise AssertionError(f"statistics of {version_url} are not float64: {raw['mean'].dtype}")
    return GaussianAccumulator.from_state_dict(raw).state_dict()


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor, the largest absolute difference (in float64)."""
    if set(a) != set(b):
        raise AssertionError(f"different statistics tensors: {sorted(a)} vs {sorted(b)}")
    out = {}
    for key in a:
        if a[key].shape != b[key].shape:
            raise AssertionError(f"{key}: {tuple(a[key].shape)} vs {tuple(b[key].shape)}")
        out[key] = float((a[key].double() - b[key].double()).abs().max())
    return out


def record_events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record every event the padim tasks emit (they are still sent to the test server).

    Args:
        monkeypatch: The test's monkeypatch.

    Returns:
        A list that fills with ``{"event", "resource", "payload"}`` as events are emitted.
    """
    import padim_prefect.tasks.events

    calls: list[dict[str, Any]] = []
    real = padim_prefect.tasks.events.emit_event

    def recording(*, event: str, resource: dict[str, str], payload: dict[str, Any] | None = None, **kw: Any) -> Any:
        calls.append({"event": event, "resource": dict(resource), "payload": dict(payload or {})})
        return real(event=event, resource=resource, payload=payload, **kw)

    monkeypatch.setattr(padim_prefect.tasks.events, "emit_event", recording)
    return calls


def events_named(calls: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The recorded events of one name."""
    return [c for c in calls if c["event"] == name]
