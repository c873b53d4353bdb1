"""Image loading: records of images read, hashed and decoded, and batches prepared ahead in threads.

Every image is identified by its URI and the sha256 of its raw bytes. A file that cannot be
decoded (or that is gone, a folder, or unreadable for its permissions) never stops a run: it comes
back as an :class:`ImageRecord` whose ``error`` holds a short human reason (the table is in
``docs/storage.md``). A *storage* fault is retried and then raised as
:class:`~padim.errors.ImageReadError` (:mod:`padim.io.reading`); the decoding policy is in
:mod:`padim.io.decoding`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image

from padim.core.alignment import reference_from_image
from padim.core.backbones import get_spec
from padim.core.config import PadimConfig
from padim.errors import ConfigError, ImageDecodeError
from padim.io.decoding import DEFAULT_MAX_PIXELS, decode_image, describe_error, reason_of
from padim.io.reading import read_raw

__all__ = [
    "ImageRecord",
    "LoadedBatch",
    "SkipRule",
    "Transform",
    "default_num_workers",
    "iter_batches",
    "load_pil",
    "load_reference",
    "read_image",
    "read_image_record",
]

Transform = Callable[[Image.Image], torch.Tensor]
"""Caller-supplied preprocessing: RGB (or 8-bit grayscale ``L``) PIL image -> tensor ``(3, H, W)``."""

SkipRule = Callable[[str, str], bool]
"""``skip(uri, sha256)``: True to leave a read and hashed image out without decoding it."""


@dataclass(frozen=True)
class ImageRecord:
    """Identity and outcome of one image.

    Attributes:
        uri: Full URI as listed (``s3://...`` or an absolute local path).
        sha256: Hex sha256 of the raw file bytes; None when the file could not be read at all.
        width: Width in pixels after EXIF orientation; None when decoding failed.
        height: Height in pixels after EXIF orientation; None when decoding failed.
        error: Short human reason why the image could not be used; None for a good image.
        skipped: True when the caller's ``skip`` rule matched the image after it was read and
            hashed (already scored, already in the model): it was not decoded.
    """

    uri: str
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    skipped: bool = False

    @property
    def ok(self) -> bool:
        """True when the image was read and decoded."""
        return self.error is None and not self.skipped


@dataclass
class LoadedBatch:
    """One batch from :func:`iter_batches`.

    Attributes:
        records: The good images, in input order; ``records[i]`` is row ``i`` of ``images``.
        images: Stacked transform outputs, shape ``(B, 3, H, W)`` with ``B == len(records)``
            (dtype as produced by the transform, float32 expected); **None when every image of
            the batch failed** (``records`` is then empty).
        failed: The images of this batch that could not be used, in input order, each with ``error``.
        skipped: The images the ``skip`` rule left out after hashing them, in input order.
    """

    records: list[ImageRecord]
    images: torch.Tensor | None
    failed: list[ImageRecord] = field(default_factory=list)
    skipped: list[ImageRecord] = field(default_factory=list)

    def __len__(self) -> int:
        """Number of good images (rows of ``images``)."""
        return len(self.records)


# --------------------------------------------------------------------------------------------
# Reading single images
# --------------------------------------------------------------------------------------------


def read_image(
    uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, skip: SkipRule | None = None, keep_gray: bool = False
) -> tuple[ImageRecord, Image.Image | None]:
    """Read, hash and decode one image without raising for bad files.

    Args:
        uri: Image URI.
        max_pixels: Largest accepted declared ``width * height``.
        skip: Optional rule applied to ``(uri, sha256)`` before decoding (see :data:`SkipRule`).
        keep_gray: Return 8-bit grayscale images as ``L`` (see :func:`~padim.io.decoding.decode_image`).

    Returns:
        ``(record, image)``: ``image`` is the RGB (or ``L``) PIL image, or None with
        ``record.error`` set (or ``record.skipped``).

    Raises:
        ImageReadError: Storage could not deliver the bytes after :data:`~padim.io.reading.READ_ATTEMPTS` reads.
    """
    try:
        data = read_raw(uri)
    except ImageDecodeError as exc:
        return ImageRecord(uri=uri, error=reason_of(exc)), None
    digest = hashlib.sha256(data).hexdigest()
    if skip is not None and skip(uri, digest):
        return ImageRecord(uri=uri, sha256=digest, skipped=True), None
    try:
        image = decode_image(data, uri, max_pixels, keep_gray)
    except ImageDecodeError as exc:
        return ImageRecord(uri=uri, sha256=digest, error=reason_of(exc)), None
    record = ImageRecord(uri=uri, sha256=digest, width=image.width, height=image.height)
    return record, image


def read_image_record(
    uri: str, transform: Transform, max_pixels: int = DEFAULT_MAX_PIXELS, skip: SkipRule | None = None
) -> tuple[ImageRecord, torch.Tensor | None]:
    """Read, hash, decode and transform one image without raising for bad files.

    Args:
        uri: Image URI.
        transform: RGB (or 8-bit grayscale ``L``) PIL image -> tensor ``(3, H, W)``.
        max_pixels: Largest accepted declared ``width * height``.
        skip: Optional rule applied to ``(uri, sha256)`` once the bytes are read: a match is
            returned with ``skipped=True`` and is not decoded.

    Returns:
        ``(record, tensor)``: ``tensor`` has shape ``(3, H, W)``, or is None with ``record.error``
        set (a transform that raises is reported as ``"transform failed: ..."``) or
        ``record.skipped`` set.

    Raises:
        ImageReadError: Storage could not deliver the bytes (see :func:`read_image`).
    """
    record, image = read_image(uri, max_pixels, skip, keep_gray=True)  # the transform converts after resizing
    if record.skipped:
        return record, None
    if image is None:
        return record, None
    try:
        tensor = transform(image)
    except Exception as exc:
        failed = ImageRecord(
            uri=uri,
            sha256=record.sha256,
            width=record.width,
            height=record.height,
            error=f"transform failed ({type(exc).__name__}: {describe_error(exc)})",
        )
        return failed, None
    finally:
        image.close()
    return record, tensor


def load_pil(uri: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load one image as RGB at its original size (for visualisation).

    Args:
        uri: Image URI.
        max_pixels: Largest accepted declared ``width * height``.

    Returns:
        The RGB PIL image, EXIF orientation applied.

    Raises:
        ImageDecodeError: The file cannot be read or decoded (``reason`` attribute set).
    """
    return decode_image(read_raw(uri), uri, max_pixels)


def load_reference(config: PadimConfig) -> torch.Tensor | None:
    """Read the registration reference a configuration names.

    Args:
        config: Model options.

    Returns:
        Gray levels (0-255) of the preprocessed reference, shape ``(S, S)``, or ``None`` when the
        configuration registers nothing or names no reference (a fitter then takes its first image).

    Raises:
        ImageDecodeError: If the image cannot be read.
    """
    if config.registration == "none" or config.reference is None:
        return None
    spec = get_spec(config.backbone)
    return reference_from_image(load_pil(config.reference), config, spec.mean, spec.std)


# --------------------------------------------------------------------------------------------
# Background batch loading
# --------------------------------------------------------------------------------------------


def default_num_workers() -> int:
    """Default decode threads: one per CPU, at most 16."""
    return max(1, min(16, os.cpu_count() or 4))


def iter_batches(
    uris: Iterable[str],
    transform: Transform,
    batch_size: int,
    num_workers: int | None = None,
    prefetch: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pin_memory: bool = False,
    skip: SkipRule | None = None,
) -> Iterator[LoadedBatch]:
    """Load images in background threads and yield them as stacked batches, in input order.

    Reading (fsspec ``cat_file``), hashing, decoding and ``transform`` run in a thread pool
    (threads, not processes: s3fs is not fork-safe, and PIL and torch release the GIL in their
    heavy loops); stacking runs in one more thread. While the consumer works on batch ``k``,
    batches ``k+1 .. k+prefetch`` are being prepared, so it only waits when decoding is slower
    than its compute. Bad files never raise: they come back in ``LoadedBatch.failed``.

    Args:
        uris: Image URIs (any iterable; consumed lazily).
        transform: RGB PIL image -> tensor ``(3, H, W)``; every call must give the same shape.
        batch_size: Images per batch (the last batch may be smaller).
        num_workers: Decode threads; default :func:`default_num_workers`.
        prefetch: Batches prepared ahead of the one being consumed (0 disables overlap).
        max_pixels: Largest accepted declared ``width * height`` per image.
        pin_memory: Pin the stacked tensor in page-locked memory (only when CUDA is available)
            for faster, asynchronous host-to-device copies.
        skip: Optional rule on ``(uri, sha256)``: matching images are read and hashed but not
            decoded, and come back in ``LoadedBatch.skipped``.

    Yields:
        One :class:`LoadedBatch` per ``batch_size`` input URIs: ``images`` of shape
        ``(B, 3, H, W)`` for the ``B`` good ones, or None when all of them failed.

    Raises:
        ConfigError: A non-positive ``batch_size``/``num_workers`` or negative ``prefetch``, or
            transform outputs whose shapes differ within a batch (a bug in the transform).
        ImageReadError: Storage could not deliver an image (raised when its batch is reached).
    """
    workers = default_num_workers() if num_workers is None else num_workers
    _check_loader_args(batch_size, workers, prefetch)
    chunks = _chunked(uris, batch_size)
    decode_pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="padim-decode")
    collate_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="padim-collate")
    pending: deque[tuple[list[Future], Future]] = deque()

    def submit_next() -> None:
        chunk = next(chunks, None)
        if chunk is None:
            return
        futures = [decode_pool.submit(read_image_record, uri, transform, max_pixels, skip) for uri in chunk]
        pending.append((futures, collate_pool.submit(_collate, futures, pin_memory)))

    try:
        for _ in range(prefetch + 1):
            submit_next()
        while pending:
            _, batch_future = pending.popleft()
            batch = batch_future.result()
            yield batch
            submit_next()
    finally:
        _cancel_pending(pending)
        decode_pool.shutdown(wait=True, cancel_futures=True)
        collate_pool.shutdown(wait=True, cancel_futures=True)


def _check_loader_args(batch_size: int, workers: int, prefetch: int) -> None:
    """Validate the loader's sizes with readable messages."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 1:
        raise ConfigError(f"num_workers must be at least 1, got {workers}")
    if prefetch < 0:
        raise ConfigError(f"prefetch must be 0 or more, got {prefetch}")


def _chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Split an iterable into lists of ``size`` items (the last may be shorter)."""
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _cancel_pending(pending: deque[tuple[list[Future], Future]]) -> None:
    """Cancel batches that were submitted but will not be consumed."""
    for futures, batch_future in pending:
        batch_future.cancel()
        for future in futures:
            future.cancel()
    pending.clear()


def _collate(futures: list[Future], pin_memory: bool) -> LoadedBatch:
    """Wait for one batch's images (in order) and stack the good ones."""
    records: list[ImageRecord] = []
    tensors: list[torch.Tensor] = []
    failed: list[ImageRecord] = []
    skipped: list[ImageRecord] = []
    for future in futures:
        record, tensor = future.result()
        if record.skipped:
            skipped.append(record)
        elif tensor is None:
            failed.append(record)
        else:
            records.append(record)
            tensors.append(tensor)
    images = _stack(tensors, records) if tensors else None
    if images is not None and pin_memory and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            images = images.pin_memory()
    return LoadedBatch(records=records, images=images, failed=failed, skipped=skipped)


def _stack(tensors: list[torch.Tensor], records: list[ImageRecord]) -> torch.Tensor:
    """Stack ``(3, H, W)`` tensors into ``(B, 3, H, W)``, explaining shape mismatches."""
    first = tensors[0]
    for tensor, record in zip(tensors, records, strict=True):
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ConfigError(f"transform must return a (3, H, W) tensor, got {shape} for {record.uri}")
        if tensor.shape != first.shape:
            raise ConfigError(
                f"transform returned tensors of different shapes: {tuple(first.shape)} for "
                f"{records[0].uri} and {tuple(tensor.shape)} for {record.uri}; "
                "it must resize every image to one fixed size"
            )
    return torch.stack(tensors, dim=0)
