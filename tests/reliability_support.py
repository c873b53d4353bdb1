"""Shared pieces of the fault suite (``tests/test_reliability*.py``): bad files, a trained store, counters.

The fault suite trains one cheap model per session (ResNet18 with seeded random weights, 56 px
input, d = 16, on small generated textures) and copies its store wherever a test damages it.
The bad-file and odd-but-valid catalogues below are what ``docs/reliability.md`` counts: the
tests assert one report row per file, so the counts in the document are the catalogues' sizes.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.flow_helpers import CHEAP_MODEL, add_defect, local_dir, png_bytes, texture, write_images

PRODUCT = "widget"
DAY = "2026-11-25"
N_NORMAL = 12

# ---- bad and odd files ------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, structurally valid PNG whose header declares ``width x height`` 1-bit pixels.

    Args:
        width: Declared width.
        height: Declared height.

    Returns:
        About 80 bytes: a decompression bomb when the declared size is huge.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _encoded(pixels: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    """Encode an RGB array (optionally converted to ``mode``) with PIL."""
    image = Image.fromarray(pixels)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


BAD_FILES: dict[str, str] = {
    "zero.png": "empty file",
    "truncated.png": "truncated",
    "truncated.jpg": "truncated",
    "header-only.png": "corrupt png",
    "random-bytes.png": "not an image",
    "text.jpg": "text file",
    "gif-named.png": "unsupported image format (gif)",
    "bomb.png": "decompression bomb",
    "too-large.png": "image too large",
    "unreadable.png": "permission denied",
    "vanished.png": "file not found",
}
"""Every bad file the suite scores, with a fragment of the reason its report row must give (lower case)."""

ODD_VALID_FILES: tuple[str, ...] = (
    "sixteen-bit.png",
    "palette.png",
    "cmyk.jpg",
    "grayscale.png",
    "rgba.png",
)
"""Valid files in unusual modes (16-bit, palette, CMYK, L, RGBA): they must be scored."""

UNREADABLE = "unreadable.png"
VANISHED = "vanished.png"


def write_bad_files(folder: Path, seed: int = 7) -> list[str]:
    """Write every file of :data:`BAD_FILES` into ``folder``.

    ``unreadable.png`` and ``vanished.png`` are valid PNGs on disk: the test makes reading the
    first fail with a permission error (:func:`deny_reads`) and removes the second after listing
    (:func:`remove_after_listing`).

    Args:
        folder: Target folder (created).
        seed: Seed of the pixel noise.

    Returns:
        The written paths, sorted.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    png = png_bytes(texture(rng))
    jpg = _encoded(texture(rng, 256), "JPEG")
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    content = {
        "zero.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: 2 * len(jpg) // 3],
        "header-only.png": png[:40],
        "random-bytes.png": b"\x00\x01" + noise,
        "text.jpg": b"this is not an image, it is a note from the night shift\n" * 20,
        "gif-named.png": _encoded(texture(rng), "GIF", "P"),
        "bomb.png": png_declaring(100_000, 100_000),
        "too-large.png": png_declaring(9_000, 9_000),
        UNREADABLE: png_bytes(texture(rng)),
        VANISHED: png_bytes(texture(rng)),
    }
    assert set(content) == set(BAD_FILES)
    for name, data in content.items():
        (folder / name).write_bytes(data)
    return sorted(str(folder / name) for name in content)


def write_odd_valid_files(folder: Path, seed: int = 8) -> list[str]:
    """Write every file of :data:`ODD_VALID_FILES` (normal-looking parts) into ``folder``.

    Returns:
        The written paths, sorted.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sixteen = (texture(rng)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    content = {
        "sixteen-bit.png": (Image.fromarray(sixteen), "PNG"),
        "palette.png": (Image.fromarray(texture(rng)).convert("P"), "PNG"),
        "cmyk.jpg": (Image.fromarray(texture(rng)).convert("CMYK"), "JPEG"),
        "grayscale.png": (Image.fromarray(texture(rng)).convert("L"), "PNG"),
        "rgba.png": (Image.fromarray(texture(rng)).convert("RGBA"), "PNG"),
    }
    assert set(content) == set(ODD_VALID_FILES)
    for name, (image, fmt) in content.items():
        image.save(folder / name, format=fmt)
    assert Image.open(folder / "sixteen-bit.png").mode.startswith("I;16")
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert Image.open(folder / "palette.png").mode == "P"
    return sorted(str(folder / name) for name in content)


def write_defective(folder: Path, names: list[str], seed: int = 9) -> list[str]:
    """Write images with a bright square (scored as anomalous, so they get heat maps).

    Returns:
        The written paths, in the order of ``names``.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        (folder / name).write_bytes(png_bytes(add_defect(texture(rng), rng)))
        paths.append(str(folder / name))
    return paths


def deny_reads(monkeypatch: pytest.MonkeyPatch, name: str = UNREADABLE) -> list[str]:
    """Make reading files called ``name`` fail as a permission error would (tests run as root).

    The local filesystem's ``cat_file`` (what the image loader calls) raises ``PermissionError``
    for that file, exactly as it does for a file without read permission.

    Returns:
        A list that receives the denied paths.
    """
    from fsspec.implementations.local import LocalFileSystem

    denied: list[str] = []
    real = LocalFileSystem.cat_file

    def cat_file(self: LocalFileSystem, path: str, *args: Any, **kwargs: Any) -> bytes:
        if str(path).endswith("/" + name):
            denied.append(str(path))
            raise PermissionError(13, "Permission denied", str(path))
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", cat_file)
    return denied


def remove_after_listing(monkeypatch: pytest.MonkeyPatch, name: str = VANISHED) -> None:
    """Delete files called ``name`` right after the flow lists the folder (a file removed mid-run)."""
    import padim_prefect.tasks.storage

    real = padim_prefect.tasks.storage.list_images

    def list_then_remove(url: str, *args: Any, **kwargs: Any) -> list[str]:
        uris = real(url, *args, **kwargs)
        for uri in uris:
            if uri.endswith("/" + name) and os.path.exists(uri):
                os.remove(uri)
        return uris

    monkeypatch.setattr(padim_prefect.tasks.storage, "list_images", list_then_remove)


def record_listing(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) every image listing a flow attempts: proof that no work started.

    Returns:
        The folder URLs the flow tried to list.
    """
    import padim_prefect.tasks.storage

    listed: list[str] = []

    def refuse(url: str, *args: Any, **kwargs: Any) -> list[str]:
        listed.append(url)
        return []

    monkeypatch.setattr(padim_prefect.tasks.storage, "list_images", refuse)
    return listed


# ---- a trained store ----------------------------------------------------------------------------------


@dataclass
class TrainedStore:
    """A local store with :data:`PRODUCT` trained once per session.

    Attributes:
        root: Temporary folder of the session's model.
        store: Store root.
        normal: Folder of the normal images.
        version: The published version.
    """

    root: Path
    store: str
    normal: str
    version: str

    def copy_to(self, target: Path) -> str:
        """Copy the whole store (for tests that damage it).

        Returns:
            The copy's root.
        """
        shutil.copytree(self.store, target)
        return str(target)


_TRAINED: dict[str, TrainedStore] = {}


def trained_store(tmp_path_factory: pytest.TempPathFactory) -> TrainedStore:
    """Train :data:`PRODUCT` once per session (memoised across the fault-suite modules).

    Must be called with a Prefect harness active.
    """
    if "store" not in _TRAINED:
        from padim_prefect.flows.train import train

        root = tmp_path_factory.mktemp("reliability-model")
        normal = local_dir(root / "normal")
        write_images(normal, N_NORMAL, seed=1)
        store = str(root / "store")
        result = train(product=PRODUCT, normal_url=normal, store=store, shard_size=6, **CHEAP_MODEL)
        _TRAINED["store"] = TrainedStore(root=root, store=store, normal=normal, version=result["version"])
    return _TRAINED["store"]


# ---- reading back what the runs wrote ---------------------------------------------------------------


def raw_report_rows(store: str, product: str = PRODUCT) -> list[dict[str, Any]]:
    """Every row of every complete report file of a product, without deduplication.

    Returns:
        Rows (dicts) as physically stored, all partitions.
    """
    from padim.io.fsio import url_to_fs
    from padim.reports import list_report_files

    rows: list[dict[str, Any]] = []
    for report in list_report_files(store, product=product):
        fs, path = url_to_fs(report.url)
        with fs.open(path, "rb") as handle:
            rows.extend(pq.read_table(handle).to_pylist())
    return rows


def rows_per_image(store: str, product: str = PRODUCT, day: str = DAY) -> Counter[str]:
    """How many rows the report queries show per image (deduplicated, as users see them)."""
    from padim.reports import query_reports

    frame = query_reports(store, product=product, since=day, until=day)
    return Counter(frame["image_uri"])


def fast_retries(monkeypatch: pytest.MonkeyPatch, *tasks: Any, delays: tuple[float, ...] = (0.2, 0.4, 0.8)) -> None:
    """Keep the tasks' retry count and exponential shape but shorten the delays (and drop jitter)."""
    for task in tasks:
        assert task.retries == 3, f"{task.name}: the production policy retries 3 times"
        monkeypatch.setattr(task, "retry_delay_seconds", list(delays))
        monkeypatch.setattr(task, "retry_jitter_factor", None)


def files_under(root: Path) -> set[str]:
    """Every file below a folder, as paths relative to it."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def iter_python_sources(*packages: str) -> Iterator[Path]:
    """The ``.py`` files of the project's packages (relative to the repository root)."""
    repo = Path(__file__).resolve().parents[1]
    for package in packages:
        yield from sorted((repo / package).rglob("*.py"))


__all__ = [
    "BAD_FILES",
    "CHEAP_MODEL",
    "DAY",
    "ODD_VALID_FILES",
    "PRODUCT",
    "TrainedStore",
    "deny_reads",
    "fast_retries",
    "files_under",
    "iter_python_sources",
    "local_dir",
    "png_declaring",
    "raw_report_rows",
    "record_listing",
    "remove_after_listing",
    "rows_per_image",
    "trained_store",
    "write_bad_files",
    "write_defective",
    "write_images",
    "write_odd_valid_files",
]
