"""Image decoding: raw file bytes -> a fully loaded 8-bit PIL image, robust to every bad file.

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
  in :class:`~padim.io.loading.ImageRecord` are the size after that rotation.
* Speed without changing a pixel: plain 8-bit grayscale or RGB PNGs (no transparency, no EXIF) are
  inflated by libspng (``pyspng``, about 1.8x PIL's PNG decoder) after PIL has parsed the header and
  checked every chunk's CRC; the pixels are identical, so the result is too (tested). The loader
  (:func:`~padim.io.loading.read_image_record`) keeps grayscale images (``L``, ``1``, ``LA``/``La`` after compositing,
  16/32-bit and float after scaling) as ``L`` for the transform, which resizes them before
  replicating the channel (the same pixels as resizing the RGB copy, in a third of the work).
* Every step of one file's decoding (checks, pixel loading, EXIF orientation, mode conversion,
  scaling, and the caller's transform in :func:`~padim.io.loading.read_image_record`) runs inside that file's error
  boundary: whatever PIL, numpy or libspng raise becomes that image's
  :class:`~padim.errors.ImageDecodeError` (an error row), never an exception that stops the run.
* Only regular files are read: on a local disk a FIFO, socket or device file is never listed
  (:mod:`padim.io.listing`) and reading one fails at once (``"not a regular file"``,
  :mod:`padim.io.reading`) instead of blocking.
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

import io

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from padim.errors import ConfigError, ImageDecodeError

try:  # libspng: a faster PNG inflater, used where it gives PIL's pixels exactly
    import pyspng as _spng
except ImportError:  # pragma: no cover - optional speed-up
    _spng = None

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "decode_error",
    "decode_image",
    "describe_error",
    "reason_of",
]

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
"""Largest accepted declared width x height (67,108,864 pixels, e.g. 8192 x 8192)."""

SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "DIB", "TIFF")
"""PIL format names :func:`decode_image` is allowed to open (JPEG includes multi-picture MPO)."""

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
        raise decode_error(uri, "empty file (0 bytes)")
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
    detail = f"{type(error).__name__}: {describe_error(error)}"
    return decode_error(uri, f"cannot decode or convert image (mode {mode}; {detail})")


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


def decode_error(uri: str, reason: str) -> ImageDecodeError:
    """Build an ImageDecodeError carrying ``reason`` and ``uri`` as attributes."""
    error = ImageDecodeError(f"cannot use image {uri}: {reason}")
    error.reason = reason  # type: ignore[attr-defined]
    error.uri = uri  # type: ignore[attr-defined]
    return error


def reason_of(error: BaseException) -> str:
    """The short reason of an ImageDecodeError (its message for other errors)."""
    return str(getattr(error, "reason", None) or error)


def _open_image(data: bytes, uri: str) -> Image.Image:
    """Open (parse the header of) an image restricted to the supported formats."""
    try:
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise decode_error(uri, f"decompression bomb rejected by PIL ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise decode_error(uri, _unidentified_reason(data)) from exc
    except Exception as exc:
        raise decode_error(uri, f"corrupt image header ({describe_error(exc)})") from exc


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
        raise decode_error(uri, f"empty image ({width}x{height} pixels)")
    if pixels > max_pixels:
        raise decode_error(
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
        raise decode_error(uri, "truncated JPEG file (no end-of-image marker)")


def _has_jpeg_end(data: bytes) -> bool:
    """True when JPEG data end with the end-of-image marker (padding ignored)."""
    return data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _verify_png(data: bytes, uri: str) -> None:
    """Walk every PNG chunk up to IEND, checking lengths and CRCs."""
    try:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as probe:
            probe.verify()
    except Exception as exc:
        raise decode_error(uri, f"truncated or corrupt PNG file ({describe_error(exc)})") from exc


def _load_pixels(image: Image.Image, uri: str) -> None:
    """Decode all pixels now so that truncation and corruption surface here."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise decode_error(uri, f"decompression bomb rejected by PIL ({exc})") from exc
    except Exception as exc:
        raise decode_error(uri, f"truncated or corrupt image data ({describe_error(exc)})") from exc


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


def describe_error(error: BaseException) -> str:
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
        raise decode_error(uri, "float image contains NaN or infinite values")


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
