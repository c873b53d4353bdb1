"""Image sources: listing image folders on any fsspec URL, robust decoding and background loading.

Every image is identified by its URI and the sha256 of its raw bytes. A file that cannot be
decoded (or that is gone, a folder, or unreadable for its permissions) never stops a run: it comes
back as an :class:`ImageRecord` whose ``error`` holds a short human reason (the table is in
``docs/storage.md``). A *storage* fault - the endpoint unreachable, a timeout, an I/O error - says
nothing about the file: the read is retried (:data:`READ_ATTEMPTS`), and if it still fails an
:class:`~padim.errors.ImageReadError` stops the work that needed the image, so its task is retried
and, failing that, the run fails and names the images it could not score.

Decoding policy (what :func:`decode_image` returns is always an 8-bit ``RGB`` PIL image):

* ``RGB``: unchanged. ``L``, ``1``, ``P`` (palette), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``:
  converted with PIL's standard conversion.
* Images with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry, ``RGBa``, ``La``)
  are composited on black: transparent pixels become black (not whatever colour the encoder left
  under them), so two files that look the same give the same tensor. Premultiplied alpha
  (``RGBa``, ``La``: TIFF "associated alpha") is unpremultiplied first, so the same rule applies.
* 16-bit grayscale (``I;16*``) is scaled by the fixed full range, ``v8 = round(v16 / 257)``
  (65535 -> 255), never by the image's own min/max: absolute brightness stays comparable across
  images, so an under-exposed part still looks under-exposed. 32-bit ``I`` images whose values fit
  in 0..65535 are treated the same; others, and float ``F`` images outside 0..1, are scaled by
  their actual min..max range (``F`` within 0..1 is multiplied by 255). A float image with any
  NaN or infinite value is rejected (``"float image contains NaN or infinite values"``): it has
  no meaningful brightness, and scoring it as a black image would hide a broken camera.
* EXIF orientation is applied (:func:`PIL.ImageOps.exif_transpose`); width and height reported
  in :class:`ImageRecord` are the size after that rotation.
* Speed without changing a pixel: plain 8-bit grayscale or RGB PNGs (no transparency, no EXIF) are
  inflated by libspng (``pyspng``, about 1.8x PIL's PNG decoder) after PIL has parsed the header and
  checked every chunk's CRC; the pixels are identical, so the result is too (tested). The loader
  (:func:`read_image_record`) keeps grayscale images (``L``, ``1``, ``LA``/``La`` after compositing,
  16/32-bit and float after scaling) as ``L`` for the transform, which resizes them before
  replicating the channel (the same pixels as resizing the RGB copy, in a third of the work).
* Every step of one file's decoding (checks, pixel loading, EXIF orientation, mode conversion,
  scaling, and the caller's transform in :func:`read_image_record`) runs inside that file's error
  boundary: whatever PIL, numpy or libspng raise becomes that image's
  :class:`~padim.errors.ImageDecodeError` (an error row), never an exception that stops the run.
* Only regular files are read: on a local disk a FIFO, socket or device file is never listed and
  reading one fails at once (``"not a regular file"``) instead of blocking.
* Only the formats of :data:`SUPPORTED_FORMATS` are opened, whatever the file extension says
  (this also keeps PIL away from formats that call external programs).
* The declared width x height is checked against ``max_pixels`` from the header, before any pixel
  is decoded. PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, not modified here)
  still applies; its error is reported as :class:`~padim.errors.ImageDecodeError` too.
* Truncated files are always rejected, even when some other code has set PIL's global
  ``ImageFile.LOAD_TRUNCATED_IMAGES``: pixels are fully loaded, PNG files are structurally
  verified (chunk lengths and CRCs up to ``IEND``) and, if that global is on, JPEG files must
  end with an end-of-image marker.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from fsspec import AbstractFileSystem
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from padim.errors import ConfigError, ImageDecodeError, ImageReadError, ImageSourceError

try:  # libspng: a faster PNG inflater, used where it gives PIL's pixels exactly
    import pyspng as _spng
except ImportError:  # pragma: no cover - optional speed-up
    _spng = None
from padim.fsio import is_local, to_url, url_to_fs

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "ImageRecord",
    "LoadedBatch",
    "SkipRule",
    "Transform",
    "decode_image",
    "default_num_workers",
    "iter_batches",
    "list_images",
    "load_pil",
    "read_image",
    "read_image_record",
]

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")
"""File extensions :func:`list_images` keeps by default (matched case-insensitively)."""

READ_ATTEMPTS = 3
"""Reads of one file before a storage fault fails the work (waits of 0.5 s, then 1 s, in between)."""

READ_RETRY_WAIT_S = 0.5
"""First wait before re-reading after a storage fault (doubled each time)."""

READ_TIMEOUT_S = 60.0
"""Longest wait for one read of one file before it counts as a storage fault (then retried like any
other). Set ``PADIM_READ_TIMEOUT_S`` to change it (seconds, > 0): a hung network mount or a stalled
endpoint then fails the work in bounded time instead of blocking the run forever."""

READ_TIMEOUT_ENV_VAR = "PADIM_READ_TIMEOUT_S"
"""Environment variable overriding :data:`READ_TIMEOUT_S`."""

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""Largest accepted declared width x height (67,108,864 pixels, e.g. 8192 x 8192)."""

SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "DIB", "TIFF")
"""PIL format names :func:`decode_image` is allowed to open (JPEG includes multi-picture MPO)."""

Transform = Callable[[Image.Image], torch.Tensor]
"""Caller-supplied preprocessing: RGB (or 8-bit grayscale ``L``) PIL image -> tensor ``(3, H, W)``."""

SkipRule = Callable[[str, str], bool]
"""``skip(uri, sha256)``: True to leave a read and hashed image out without decoding it."""

_HIGH_DEPTH_16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_EXIF_ORIENTATION = 0x0112

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
    (b"RIFF", "RIFF/WebP"),
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript"),
)


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
# Listing
# --------------------------------------------------------------------------------------------


def list_images(
    url: str,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    include_hidden: bool = False,
) -> list[str]:
    """List image files under a folder or object-store prefix, recursively.

    Args:
        url: Folder URL: a local path, ``file://...`` or ``s3://bucket/prefix``.
        extensions: Extensions to keep, with or without a dot, matched case-insensitively.
        include_hidden: Also list files or folders whose name starts with ``.`` (skipped by
            default: ``.ipynb_checkpoints``, macOS ``._x.png`` resource forks and the like).

    Returns:
        Full URIs sorted lexicographically (deterministic): ``s3://bucket/key`` for S3 (keys kept
        exactly); for local folders the normalised absolute path below the folder's real path
        (symlinks of the folder resolved, ``..`` and ``//`` removed), so a folder named in several
        ways gives the same URIs; a name whose bytes are not valid UTF-8 as a percent-encoded
        ``file://`` URL (:func:`padim.fsio.local_uri`). An existing folder without images gives ``[]``.

    Raises:
        ImageSourceError: The folder does not exist, is a file, or cannot be listed.
    """
    wanted = _normalise_extensions(extensions)
    fs, root = url_to_fs(url)
    if is_local(url):
        root = os.path.realpath(root)  # one URI per file, whichever symlinked name the folder was given by
    try:
        fs.invalidate_cache(root)
        if not fs.isdir(root):
            if fs.exists(root):
                raise ImageSourceError(f"not a folder: {url}")
            raise ImageSourceError(f"no such folder: {url}")
        paths = _without_special_files(fs, fs.find(root, withdirs=False))
    except PermissionError as exc:
        raise ImageSourceError(f"cannot list {url}: permission denied") from exc
    except FileNotFoundError as exc:
        raise ImageSourceError(f"no such folder: {url}") from exc
    except OSError as exc:
        raise ImageSourceError(f"cannot list {url}: {exc}") from exc
    prefix = root.rstrip("/") + "/"
    kept = [to_url(fs, p) for p in paths if _has_extension(p, wanted) and (include_hidden or not _is_hidden(p, prefix))]
    return sorted(kept)


def _is_special_local_file(fs: AbstractFileSystem, path: str) -> bool:
    """True for a local path that exists and is neither a regular file nor a folder.

    FIFOs, sockets and device files: opening one for reading can block forever (a FIFO waits for
    a writer) or never end (``/dev/zero``). Symbolic links are followed; a path that cannot be
    examined is left to the read, which reports it. Object stores hold only regular objects.
    """
    if not _is_local_fs(fs):
        return False
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _is_local_fs(fs: AbstractFileSystem) -> bool:
    """True for fsspec's local file system."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _without_special_files(fs: AbstractFileSystem, paths: Iterable[str]) -> list[str]:
    """Drop local FIFOs, sockets and device files from a listing, with a warning naming each."""
    kept = []
    for path in paths:
        if _is_special_local_file(fs, path):
            logger.warning("skipping %s: not a regular file (a FIFO, socket or device)", path)
        else:
            kept.append(path)
    return kept


def _normalise_extensions(extensions: Sequence[str]) -> frozenset[str]:
    """Lower-case extensions without their leading dot."""
    if isinstance(extensions, str):
        extensions = (extensions,)
    wanted = frozenset(e.lower().lstrip(".") for e in extensions if e.strip("."))
    if not wanted:
        raise ConfigError("extensions must name at least one file extension, e.g. ('png', 'jpg')")
    return wanted


def _has_extension(path: str, wanted: frozenset[str]) -> bool:
    """True when the file name ends with one of the wanted extensions (case-insensitive)."""
    name = path.rsplit("/", 1)[-1]
    _, dot, ext = name.rpartition(".")
    return bool(dot) and ext.lower() in wanted


def _is_hidden(path: str, root_prefix: str) -> bool:
    """True when a component of ``path`` below the listed root starts with a dot."""
    relative = path[len(root_prefix) :] if path.startswith(root_prefix) else path
    return any(part.startswith(".") for part in relative.split("/"))


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def decode_image(data: bytes, uri: str, max_pixels: int = DEFAULT_MAX_PIXELS, keep_gray: bool = False) -> Image.Image:
    """Decode raw file bytes into an 8-bit RGB image (see the module docstring for the policy).

    Args:
        data: The complete file content.
        uri: Where the bytes came from (only used in error messages).
        max_pixels: Largest accepted declared ``width * height``, checked before decoding.
        keep_gray: Return a grayscale source (``L``, ``1``, ``LA``/``La`` composited, 16/32-bit
            or float scaled) as 8-bit ``L`` instead of replicating it into RGB (for a transform
            that converts after resizing: the same pixels either way).

    Returns:
        A fully loaded ``RGB`` PIL image (or ``L`` with ``keep_gray``), EXIF orientation applied.

    Raises:
        ImageDecodeError: With attribute ``reason`` (a short human reason) for an empty,
            truncated, corrupt, unsupported or oversized file.
    """
    if max_pixels <= 0:
        raise ConfigError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise _decode_error(uri, "empty file (0 bytes)")
    image = _open_image(data, uri)
    opened = image
    try:
        result = _decode_opened(image, data, uri, max_pixels, keep_gray)
    except ImageDecodeError:
        opened.close()
        raise
    except Exception as exc:  # the file's own error boundary: nothing from PIL/numpy escapes
        opened.close()
        raise _conversion_error(uri, opened.mode, exc) from exc
    except BaseException:
        opened.close()
        raise
    if result is not opened:
        opened.close()
    return result


def _decode_opened(image: Image.Image, data: bytes, uri: str, max_pixels: int, keep_gray: bool) -> Image.Image:
    """Check, load, orient and convert an opened image (every step of one file's decoding).

    Returns:
        An ``RGB`` image, or ``L`` when ``keep_gray`` is set and the source is grayscale.

    Raises:
        ImageDecodeError: The file is oversized, truncated, corrupt or has non-finite values.
        Exception: Anything PIL or numpy raise while converting (turned into an
            :class:`ImageDecodeError` by :func:`decode_image`).
    """
    _check_declared_size(image, uri, max_pixels)
    _check_complete(image, data, uri)
    fast = _inflate_plain_png(image, data)
    if fast is not None:
        image.close()
        image = fast
    else:
        _fix_libtiff_float_byte_order(image)
        _load_pixels(image, uri)
    oriented = _apply_exif_orientation(image)
    if oriented is not image:
        image.close()
    _check_finite(oriented, uri)
    result = _to_gray_or_rgb(oriented)
    if result is not oriented:
        oriented.close()
    return result if keep_gray or result.mode == "RGB" else result.convert("RGB")


def _conversion_error(uri: str, mode: str, error: Exception) -> ImageDecodeError:
    """Describe an unexpected failure while decoding or converting one image."""
    detail = f"{type(error).__name__}: {_describe(error)}"
    return _decode_error(uri, f"cannot decode or convert image (mode {mode}; {detail})")


def _inflate_plain_png(image: Image.Image, data: bytes) -> Image.Image | None:
    """Decode a plain 8-bit grayscale or RGB PNG with libspng, or ``None`` to let PIL do it.

    Only images whose pixels PIL would return unchanged qualify: mode ``L`` or ``RGB`` (8 bits per
    sample, no palette), no transparency chunk and no EXIF chunk (whose orientation PIL applies).
    The header and every chunk's CRC were checked already (:func:`_check_complete`).
    """
    if image.format != "PNG" or image.mode not in ("L", "RGB") or "transparency" in image.info:
        return None
    if b"eXIf" in data[: data.find(b"IDAT")] or _spng is None:
        return None
    try:
        pixels = _spng.load(data)
    except Exception:  # PIL's decoder gives the canonical error for anything libspng refuses
        return None
    if pixels.dtype != np.uint8 or pixels.shape[:2] != (image.height, image.width):
        return None
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    expected = 2 if image.mode == "L" else 3
    if pixels.ndim != expected or (expected == 3 and pixels.shape[2] != 3):
        return None
    return Image.fromarray(pixels, mode=image.mode)


def _decode_error(uri: str, reason: str) -> ImageDecodeError:
    """Build an ImageDecodeError carrying ``reason`` and ``uri`` as attributes."""
    error = ImageDecodeError(f"cannot use image {uri}: {reason}")
    error.reason = reason  # type: ignore[attr-defined]
    error.uri = uri  # type: ignore[attr-defined]
    return error


def _reason_of(error: BaseException) -> str:
    """The short reason of an ImageDecodeError (its message for other errors)."""
    return str(getattr(error, "reason", None) or error)


def _open_image(data: bytes, uri: str) -> Image.Image:
    """Open (parse the header of) an image restricted to the supported formats."""
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _decode_error(uri, f"decompression bomb rejected by PIL ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise _decode_error(uri, _unidentified_reason(data)) from exc
    except Exception as exc:
        raise _decode_error(uri, f"corrupt image header ({_describe(exc)})") from exc


def _unidentified_reason(data: bytes) -> str:
    """Explain why PIL could not identify a file, from its first bytes."""
    kind = _sniff_format(data)
    if kind in SUPPORTED_FORMATS:
        return f"corrupt {kind} file (header unreadable or no image data)"
    if kind is not None:
        return f"unsupported image format ({kind})"
    if _looks_like_text(data):
        return "not an image (looks like a text file)"
    return "not an image (unrecognised file format)"


def _sniff_format(data: bytes) -> str | None:
    """Name the format announced by a file's magic bytes, if any."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def _looks_like_text(data: bytes) -> bool:
    """True when the first KiB decodes as UTF-8 without control characters (other than spacing)."""
    head = data[:1024]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character may be cut at the 1 KiB boundary.
        try:
            text = head[:-4].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(ch.isprintable() or ch in "\t\r\n\f" for ch in text)


def _check_declared_size(image: Image.Image, uri: str, max_pixels: int) -> None:
    """Reject images whose header declares zero or too many pixels."""
    width, height = image.size
    pixels = width * height
    if pixels == 0:
        raise _decode_error(uri, f"empty image ({width}x{height} pixels)")
    if pixels > max_pixels:
        raise _decode_error(
            uri,
            f"image too large: {width}x{height} = {pixels:,} pixels exceeds the limit of "
            f"{max_pixels:,} (possible decompression bomb)",
        )


def _check_complete(image: Image.Image, data: bytes, uri: str) -> None:
    """Detect truncation independently of PIL's global LOAD_TRUNCATED_IMAGES switch."""
    if image.format == "PNG":
        _verify_png(data, uri)
    elif image.format in ("JPEG", "MPO") and ImageFile.LOAD_TRUNCATED_IMAGES and not _has_jpeg_end(data):
        # PIL would fill a truncated JPEG with grey; require the end-of-image marker instead.
        raise _decode_error(uri, "truncated JPEG file (no end-of-image marker)")


def _has_jpeg_end(data: bytes) -> bool:
    """True when JPEG data end with the end-of-image marker (padding ignored)."""
    return data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _verify_png(data: bytes, uri: str) -> None:
    """Walk every PNG chunk up to IEND, checking lengths and CRCs."""
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as probe:
            probe.verify()
    except Exception as exc:
        raise _decode_error(uri, f"truncated or corrupt PNG file ({_describe(exc)})") from exc


def _load_pixels(image: Image.Image, uri: str) -> None:
    """Decode all pixels now so that truncation and corruption surface here."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise _decode_error(uri, f"decompression bomb rejected by PIL ({exc})") from exc
    except Exception as exc:
        raise _decode_error(uri, f"truncated or corrupt image data ({_describe(exc)})") from exc


def _fix_libtiff_float_byte_order(image: Image.Image) -> None:
    """Read compressed big-endian float TIFFs in the byte order libtiff delivers (native).

    libtiff returns decompressed samples in the host's byte order; Pillow (up to at least 13.0)
    corrects that for 16-bit samples but unpacks 32-bit floats as big-endian again, so a compressed
    ``MM`` float TIFF came back as finite garbage (NaN and infinity hidden). This does for floats
    what Pillow does for 16-bit samples; a tile Pillow already reads natively is left alone.
    """
    if image.format != "TIFF" or image.mode != "F":
        return
    make_tile = getattr(ImageFile, "_Tile", None) or (lambda *parts: tuple(parts))  # Pillow < 11: tuples
    fixed = []
    for tile in image.tile:
        codec, extents, offset, args = tile[:4]
        if codec == "libtiff" and isinstance(args, tuple) and args and args[0] == "F;32BF":
            tile = make_tile(codec, extents, offset, ("F;32NF", *args[1:]))
        fixed.append(tile)
    image.tile = fixed


def _describe(error: BaseException) -> str:
    """One-line description of a low-level error."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text or type(error).__name__


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    """Rotate/flip according to the EXIF orientation tag (unchanged when absent or unreadable)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:
        return image
    if orientation in (None, 1):
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _check_finite(image: Image.Image, uri: str) -> None:
    """Reject a float image holding NaN or infinite values (it has no meaningful brightness)."""
    if image.mode != "F":
        return
    if not np.isfinite(np.asarray(image)).all():
        raise _decode_error(uri, "float image contains NaN or infinite values")


def _to_gray_or_rgb(image: Image.Image) -> Image.Image:
    """Convert any supported mode to 8-bit ``L`` (grayscale sources) or ``RGB`` (policy in the module docstring).

    Raises:
        ValueError: PIL cannot convert the mode (reported per file by :func:`decode_image`).
    """
    mode = image.mode
    if mode in ("RGB", "L"):
        return image
    if mode in _HIGH_DEPTH_16 or mode in ("I", "F"):
        return _high_depth_to_gray(image)
    if mode == "1":
        return image.convert("L")
    if mode == "P" and "transparency" in image.info:
        return _composite_on_black(image.convert("RGBA"))
    if mode in _ALPHA_MODES:
        return _composite_on_black(image)
    return image.convert("RGB")


def _composite_on_black(image: Image.Image) -> Image.Image:
    """Composite an image with alpha over a black background.

    Premultiplied modes (``La``, ``RGBa``) are unpremultiplied first, so every alpha mode follows
    the same rule: a transparent pixel is black whatever colour is stored under it.

    Returns:
        ``L`` for grayscale with alpha (``LA``, ``La``), ``RGB`` otherwise.
    """
    gray = image.mode in ("LA", "La")
    straight = image.convert("LA" if gray else "RGBA")
    base_mode = "L" if gray else "RGB"
    background = Image.new(base_mode, straight.size, 0)
    background.paste(straight.convert(base_mode), mask=straight.getchannel("A"))
    return background


def _high_depth_to_gray(image: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or (finite) float grayscale image to 8-bit ``L``."""
    values = np.asarray(image)
    if image.mode in _HIGH_DEPTH_16 or _fits_16bit(image.mode, values):
        scaled = _scale_full_16bit(values)
    elif image.mode == "F" and values.size and np.nanmin(values) >= 0 and np.nanmax(values) <= 1:
        scaled = np.rint(np.nan_to_num(values.astype(np.float64)) * 255.0)
    else:
        scaled = _scale_by_range(values)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))


def _fits_16bit(mode: str, values: np.ndarray) -> bool:
    """True for a 32-bit integer image whose values all lie in 0..65535."""
    return mode == "I" and values.size > 0 and values.min() >= 0 and values.max() <= 65535


def _scale_full_16bit(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 to 0..255 with rounding (v / 257)."""
    return (values.astype(np.uint32) + 128) // 257


def _scale_by_range(values: np.ndarray) -> np.ndarray:
    """Map the finite min..max of an array to 0..255 (a constant image maps to 0)."""
    data = values.astype(np.float64)
    finite = np.isfinite(data)
    if not finite.any():
        return np.zeros(data.shape, dtype=np.float64)
    low, high = float(data[finite].min()), float(data[finite].max())
    span = high - low
    data = np.where(finite, data, low)
    if span <= 0:
        return np.zeros(data.shape, dtype=np.float64)
    return np.rint((data - low) / span * 255.0)


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
        keep_gray: Return 8-bit grayscale images as ``L`` (see :func:`decode_image`).

    Returns:
        ``(record, image)``: ``image`` is the RGB (or ``L``) PIL image, or None with
        ``record.error`` set (or ``record.skipped``).

    Raises:
        ImageReadError: Storage could not deliver the bytes after :data:`READ_ATTEMPTS` reads.
    """
    try:
        data = _read_raw(uri)
    except ImageDecodeError as exc:
        return ImageRecord(uri=uri, error=_reason_of(exc)), None
    digest = hashlib.sha256(data).hexdigest()
    if skip is not None and skip(uri, digest):
        return ImageRecord(uri=uri, sha256=digest, skipped=True), None
    try:
        image = decode_image(data, uri, max_pixels, keep_gray)
    except ImageDecodeError as exc:
        return ImageRecord(uri=uri, sha256=digest, error=_reason_of(exc)), None
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
            error=f"transform failed ({type(exc).__name__}: {_describe(exc)})",
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
    return decode_image(_read_raw(uri), uri, max_pixels)


def _read_raw(uri: str) -> bytes:
    """Read a file's bytes.

    What is a property of the file becomes an :class:`ImageDecodeError` (the image gets an error
    row): it is a folder, it is gone, or - on a local disk - its permissions forbid reading or it is
    not a regular file (a FIFO, socket or device: refused before opening, never read). Any
    other failure is a storage fault: the read is retried, then :class:`ImageReadError` is raised.

    Raises:
        ImageDecodeError: The file itself cannot be read.
        ImageReadError: Storage failed :data:`READ_ATTEMPTS` times.
    """
    fs, path = url_to_fs(uri)
    local = _is_local_fs(fs)
    if _is_special_local_file(fs, path):
        raise _decode_error(uri, "not a regular file (a FIFO, socket or device)")
    wait = READ_RETRY_WAIT_S
    timeout = read_timeout_s()
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return _cat_within(fs, path, timeout)
        except IsADirectoryError as exc:
            raise _decode_error(uri, "is a folder, not a file") from exc
        except FileNotFoundError as exc:
            raise _decode_error(uri, "file not found (removed after listing?)") from exc
        except PermissionError as exc:
            if local:
                raise _decode_error(uri, "permission denied") from exc
            fault: Exception = exc  # remote access denied: credentials or policy, not the file
        except Exception as exc:
            fault = exc
        if attempt < READ_ATTEMPTS:
            time.sleep(wait)
            wait *= 2
    raise ImageReadError(uri, f"{type(fault).__name__}: {_describe(fault)}") from fault


def read_timeout_s() -> float:
    """The read timeout in force: ``PADIM_READ_TIMEOUT_S`` when set, else :data:`READ_TIMEOUT_S`.

    Raises:
        ConfigError: ``PADIM_READ_TIMEOUT_S`` is not a positive number of seconds.
    """
    raw = os.environ.get(READ_TIMEOUT_ENV_VAR, "").strip()
    if not raw:
        return READ_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise ConfigError(f"{READ_TIMEOUT_ENV_VAR} must be a positive number of seconds, got {raw!r}")
    return value


def _cat_within(fs: AbstractFileSystem, path: str, timeout: float) -> bytes:
    """Read a whole file, giving up after ``timeout`` seconds.

    The read runs in a daemon thread: a read blocked in the kernel (a hung network mount) or in a
    stalled connection cannot be cancelled, but the caller stops waiting for it, so the fault is
    retried and then reported like any other storage fault, and the process can still exit.

    Raises:
        TimeoutError: No answer within ``timeout`` seconds.
        Exception: Whatever the read raised.
    """
    outcome: dict[str, object] = {}
    done = threading.Event()

    def read() -> None:
        try:
            outcome["data"] = fs.cat_file(path)
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=read, name="padim-read", daemon=True).start()
    if not done.wait(timeout):
        raise TimeoutError(f"no answer from storage within {timeout:g} s ({READ_TIMEOUT_ENV_VAR})")
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    return outcome["data"]  # type: ignore[return-value]


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
