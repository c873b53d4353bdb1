"""Robustness of image decoding: one bad file must never cost a night (issue 14).

* A seeded fuzz writes a few thousand small files - TIFFs over header fields (photometric
  interpretation x samples per pixel x bits per sample x sample format x extra samples, with a
  drawn compression and byte order), float TIFFs with and without NaN/infinity, PNGs over colour
  type x bit depth x palette x tRNS x interlace, and truncated and bit-flipped copies of well-formed
  files - and reads each one with :func:`padim.io.loading.read_image_record` (what the engine's loader
  calls) and the model's real transform: no exception escapes, every file gives exactly one
  outcome, and no image with NaN or infinite float values is accepted.
* Every PIL mode a camera or tool writes converts to 8-bit RGB, and the grayscale speed path
  (``keep_gray``) gives the transform the same pixels as the RGB path.
* Special files (FIFOs, sockets, devices) are never listed and never block a read.
* A night with a premultiplied-alpha TIFF, an all-NaN float TIFF, a truncated PNG and a FIFO is
  scored by :func:`padim.jobs.engine.score_images` with one result per file.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import numpy as np
import pytest
import torch
from PIL import Image

from padim.core.config import PadimConfig
from padim.core.fitter import PadimFitter, build_model
from padim.core.preprocessing import Preprocessor
from padim.errors import ImageDecodeError
from padim.io import decoding
from padim.io.decoding import decode_image
from padim.io.listing import list_images
from padim.io.loading import ImageRecord, iter_batches, load_pil, read_image_record
from padim.jobs.engine import score_images

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # PIL's notes on the corrupt files

SEED = 14
SIDE = 32
FUZZ_MAX_PIXELS = 1 << 22  # a flipped size field must not make the fuzz allocate gigabytes
NONFINITE_REASON = "contains NaN or infinite values"

_SHORT, _LONG = 3, 4
_TAG_WIDTH, _TAG_HEIGHT, _TAG_BITS, _TAG_COMPRESSION, _TAG_PHOTOMETRIC = 256, 257, 258, 259, 262
_TAG_STRIP_OFFSETS, _TAG_SAMPLES, _TAG_ROWS_PER_STRIP, _TAG_STRIP_BYTES = 273, 277, 278, 279
_TAG_PLANAR, _TAG_COLORMAP, _TAG_EXTRA_SAMPLES, _TAG_SAMPLE_FORMAT = 284, 320, 338, 339

PHOTOMETRICS = (0, 1, 2, 3, 5, 6, 8)  # min-is-white, min-is-black, RGB, palette, CMYK, YCbCr, CIELab
SAMPLES = (1, 2, 3, 4)
BITS = (1, 8, 16, 32)
SAMPLE_FORMATS = (None, 1, 2, 3)  # absent, unsigned, signed, IEEE float
EXTRA_SAMPLES = (None, 0, 1, 2)  # absent, unspecified, associated (premultiplied), unassociated alpha
COMPRESSIONS = (1, 8, 32773, 5)  # none, deflate, packbits, LZW (declared over raw data: corrupt)
FLOAT_CONTENTS = ("unit", "wide", "one-nan", "one-inf", "all-nan", "all-neg-inf")
PNG_COLOUR_TYPES = (0, 2, 3, 4, 6, 5)  # 5 is not a PNG colour type
PNG_BIT_DEPTHS = (1, 2, 4, 8, 16)
PNG_PALETTES = ("none", "full", "short")
PNG_TRNS = ("none", "valid", "oversized")


@dataclass(frozen=True)
class FuzzFile:
    """One generated file: its name (unique, tells what it is) and content."""

    name: str
    data: bytes


# ---- builders -----------------------------------------------------------------------------------


def tiff_bytes(
    width: int,
    height: int,
    *,
    photometric: int,
    samples: int,
    bits: int,
    sample_format: int | None,
    extra: int | None,
    compression: int,
    pixels: bytes,
    big_endian: bool = False,
) -> bytes:
    """A single-strip baseline TIFF built field by field (no validation: any combination is written).

    Args:
        width: ImageWidth.
        height: ImageLength.
        photometric: PhotometricInterpretation.
        samples: SamplesPerPixel (BitsPerSample and SampleFormat repeat per sample).
        bits: BitsPerSample of every sample.
        sample_format: SampleFormat, or None to leave the tag out.
        extra: ExtraSamples (one entry), or None to leave the tag out.
        compression: Compression; 8 (deflate) and 32773 (packbits) compress ``pixels``, any other
            value stores them as they are.
        pixels: Uncompressed strip bytes.
        big_endian: Write ``MM`` (Motorola) byte order instead of ``II``.

    Returns:
        The file content.
    """
    order = ">" if big_endian else "<"
    payload = compress_strip(pixels, compression, row_bytes(width, samples, bits))
    tags: list[tuple[int, int, list[int]]] = [
        (_TAG_WIDTH, _LONG, [width]),
        (_TAG_HEIGHT, _LONG, [height]),
        (_TAG_BITS, _SHORT, [bits] * samples),
        (_TAG_COMPRESSION, _SHORT, [compression]),
        (_TAG_PHOTOMETRIC, _SHORT, [photometric]),
        (_TAG_STRIP_OFFSETS, _LONG, [8]),
        (_TAG_SAMPLES, _SHORT, [samples]),
        (_TAG_ROWS_PER_STRIP, _LONG, [height]),
        (_TAG_STRIP_BYTES, _LONG, [len(payload)]),
        (_TAG_PLANAR, _SHORT, [1]),
    ]
    if photometric == 3 and bits <= 8:
        tags.append((_TAG_COLORMAP, _SHORT, [(i * 4099) % 65536 for i in range(3 * 2**bits)]))
    if extra is not None:
        tags.append((_TAG_EXTRA_SAMPLES, _SHORT, [extra]))
    if sample_format is not None:
        tags.append((_TAG_SAMPLE_FORMAT, _SHORT, [sample_format] * samples))
    return assemble_tiff(order, payload, sorted(tags))


def assemble_tiff(order: str, payload: bytes, tags: list[tuple[int, int, list[int]]]) -> bytes:
    """Lay out header, strip, out-of-line tag values and the IFD."""
    body = bytearray(payload)
    if len(body) % 2:
        body.append(0)
    entries = []
    for tag, kind, values in tags:
        code = "H" if kind == _SHORT else "I"
        packed = struct.pack(f"{order}{len(values)}{code}", *values)
        if len(packed) <= 4:
            field = packed.ljust(4, b"\x00")
        else:
            field = struct.pack(f"{order}I", 8 + len(body))
            body += packed
        entries.append(struct.pack(f"{order}HHI", tag, kind, len(values)) + field)
    ifd_offset = 8 + len(body)
    magic = b"MM\x00*" if order == ">" else b"II*\x00"
    ifd = struct.pack(f"{order}H", len(entries)) + b"".join(entries) + b"\x00\x00\x00\x00"
    return magic + struct.pack(f"{order}I", ifd_offset) + bytes(body) + ifd


def row_bytes(width: int, samples: int, bits: int) -> int:
    """Bytes of one uncompressed, chunky row."""
    return (width * samples * bits + 7) // 8


def compress_strip(pixels: bytes, compression: int, stride: int) -> bytes:
    """Compress a strip with deflate or packbits (literal runs per row); other values: unchanged."""
    if compression == 8:
        return zlib.compress(pixels)
    if compression != 32773:
        return pixels
    out = bytearray()
    for start in range(0, len(pixels), stride):
        row = pixels[start : start + stride]
        for chunk in range(0, len(row), 128):
            piece = row[chunk : chunk + 128]
            out.append(len(piece) - 1)
            out += piece
    return bytes(out)


def random_samples(rng: np.random.Generator, count: int, bits: int, sample_format: int | None) -> np.ndarray:
    """``count`` samples of a bit depth and format (floats finite and within 0..1)."""
    if sample_format == 3 and bits == 32:
        return rng.random(count, dtype=np.float32)
    if sample_format == 3 and bits == 16:
        return rng.random(count).astype(np.float16)
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}.get(bits, np.uint8)
    return rng.integers(0, np.iinfo(dtype).max, count, dtype=dtype, endpoint=True)


def strip_bytes(values: np.ndarray, bits: int, big_endian: bool) -> bytes:
    """Serialise samples in the file's byte order (1-bit samples are packed from the low bit)."""
    if bits == 1:
        return np.packbits(values.astype(np.uint8) & 1).tobytes()
    return values.astype(values.dtype.newbyteorder(">" if big_endian else "<")).tobytes()


def header_fuzz_tiffs(rng: np.random.Generator) -> list[FuzzFile]:
    """Every combination of the TIFF header fields, each with a drawn compression and byte order."""
    files = []
    for photometric in PHOTOMETRICS:
        for samples in SAMPLES:
            for bits in BITS:
                for sample_format in SAMPLE_FORMATS:
                    for extra in EXTRA_SAMPLES:
                        compression = int(rng.choice(COMPRESSIONS))
                        big_endian = bool(rng.integers(2))
                        width, height = int(rng.integers(1, 12)), int(rng.integers(1, 9))
                        if bits == 1:
                            values = rng.integers(0, 2, width * samples * height)
                            pixels = b"".join(
                                strip_bytes(values[r * width * samples : (r + 1) * width * samples], 1, big_endian)
                                for r in range(height)
                            )
                        else:
                            values = random_samples(rng, width * height * samples, bits, sample_format)
                            pixels = strip_bytes(values, bits, big_endian)
                        name = (
                            f"hdr_pi{photometric}_s{samples}_b{bits}_f{sample_format}_x{extra}"
                            f"_c{compression}_{'mm' if big_endian else 'ii'}.tif"
                        )
                        data = tiff_bytes(
                            width,
                            height,
                            photometric=photometric,
                            samples=samples,
                            bits=bits,
                            sample_format=sample_format,
                            extra=extra,
                            compression=compression,
                            pixels=pixels,
                            big_endian=big_endian,
                        )
                        files.append(FuzzFile(name, data))
    return files


def float_values(rng: np.random.Generator, content: str, count: int) -> np.ndarray:
    """Float32 samples: within 0..1, a wide range, or with NaN/infinity planted."""
    values = rng.random(count, dtype=np.float32) if content == "unit" else rng.normal(0, 1e4, count).astype(np.float32)
    if content == "one-nan":
        values[int(rng.integers(count))] = np.nan
    elif content == "one-inf":
        values[int(rng.integers(count))] = np.inf
    elif content == "all-nan":
        values[:] = np.nan
    elif content == "all-neg-inf":
        values[:] = -np.inf
    return values


def float_tiffs(rng: np.random.Generator) -> list[FuzzFile]:
    """Float32 grayscale TIFFs, finite or with NaN/infinity, over compression and byte order."""
    files = []
    for content in FLOAT_CONTENTS:
        for photometric in (0, 1):
            for compression in (1, 8, 32773):
                for big_endian in (False, True):
                    width, height = int(rng.integers(1, 12)), int(rng.integers(1, 9))
                    values = float_values(rng, content, width * height)
                    data = tiff_bytes(
                        width,
                        height,
                        photometric=photometric,
                        samples=1,
                        bits=32,
                        sample_format=3,
                        extra=None,
                        compression=compression,
                        pixels=strip_bytes(values, 32, big_endian),
                        big_endian=big_endian,
                    )
                    order = "mm" if big_endian else "ii"
                    files.append(FuzzFile(f"float_{content}_pi{photometric}_c{compression}_{order}.tif", data))
    return files


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bytes(
    rng: np.random.Generator, *, colour_type: int, depth: int, palette: str, trns: str, interlace: int
) -> bytes:
    """A PNG built chunk by chunk over colour type x bit depth x PLTE x tRNS (no validation).

    Pixel rows are random (filter type 0); with ``interlace`` the IHDR says Adam7 but the rows are
    not interlaced, so the image data do not match the header.
    """
    width, height = int(rng.integers(1, 12)), int(rng.integers(1, 9))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour_type, 1)
    stride = (width * channels * depth + 7) // 8
    rows = b"".join(b"\x00" + rng.bytes(stride) for _ in range(height))
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, interlace))]
    entries = {"none": 0, "full": min(256, 2**depth), "short": 1}[palette]
    if entries:
        chunks.append(png_chunk(b"PLTE", rng.bytes(3 * entries)))
    if trns == "valid":
        body = {0: struct.pack(">H", 1), 2: struct.pack(">HHH", 1, 2, 3)}.get(colour_type, rng.bytes(max(1, entries)))
        chunks.append(png_chunk(b"tRNS", body))
    elif trns == "oversized":
        chunks.append(png_chunk(b"tRNS", rng.bytes(300)))
    chunks += [png_chunk(b"IDAT", zlib.compress(rows)), png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def header_fuzz_pngs(rng: np.random.Generator) -> list[FuzzFile]:
    """Every combination of PNG colour type, bit depth, palette, tRNS and interlace flag."""
    files = []
    for colour_type in PNG_COLOUR_TYPES:
        for depth in PNG_BIT_DEPTHS:
            for palette in PNG_PALETTES:
                for trns in PNG_TRNS:
                    for interlace in (0, 1):
                        data = png_bytes(
                            rng, colour_type=colour_type, depth=depth, palette=palette, trns=trns, interlace=interlace
                        )
                        name = f"png_t{colour_type}_d{depth}_p{palette}_t{trns}_i{interlace}.png"
                        files.append(FuzzFile(name, data))
    return files


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """Encode a PIL image to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def well_formed_files(rng: np.random.Generator) -> list[FuzzFile]:
    """Valid files of the common kinds (the seeds of the truncation and bit-flip variants)."""
    rgb = Image.fromarray(rng.integers(0, 256, (24, 31, 3), dtype=np.uint8))
    gray = rgb.convert("L")
    sixteen = Image.fromarray(rng.integers(0, 65536, (24, 31), dtype=np.uint16))
    floats = Image.fromarray(rng.random((24, 31), dtype=np.float32))
    premultiplied = la_tiff(rng, 31, 24)
    files = [
        FuzzFile("seed_rgb.png", encode(rgb, "PNG")),
        FuzzFile("seed_l.png", encode(gray, "PNG")),
        FuzzFile("seed_rgba.png", encode(rgb.convert("RGBA"), "PNG")),
        FuzzFile("seed_la.png", encode(gray.convert("LA"), "PNG")),
        FuzzFile("seed_p.png", encode(rgb.convert("P"), "PNG")),
        FuzzFile("seed_i16.png", encode(sixteen, "PNG")),
        FuzzFile("seed_rgb.jpg", encode(rgb, "JPEG", quality=90)),
        FuzzFile("seed_l.jpg", encode(gray, "JPEG", quality=90)),
        FuzzFile("seed_rgb.bmp", encode(rgb, "BMP")),
        FuzzFile("seed_f.tif", encode(floats, "TIFF")),
        FuzzFile("seed_la_assoc.tif", premultiplied),
    ]
    for compression in ("raw", "tiff_deflate", "tiff_lzw", "packbits"):
        files.append(FuzzFile(f"seed_rgb_{compression}.tif", encode(rgb, "TIFF", compression=compression)))
        files.append(FuzzFile(f"seed_i16_{compression}.tif", encode(sixteen, "TIFF", compression=compression)))
    return files


def mutated_files(rng: np.random.Generator, seeds: list[FuzzFile], per_seed: int) -> list[FuzzFile]:
    """Truncated, bit-flipped and byte-smashed copies of each seed file."""
    files = []
    for seed in seeds:
        size = len(seed.data)
        for i in range(per_seed):
            cut = int(rng.integers(1, size))
            files.append(FuzzFile(f"cut{i}_{cut}_{seed.name}", seed.data[:cut]))
            flipped = bytearray(seed.data)
            position = int(rng.integers(size))
            flipped[position] ^= 1 << int(rng.integers(8))
            files.append(FuzzFile(f"flip{i}_{position}_{seed.name}", bytes(flipped)))
            smashed = bytearray(seed.data)
            for position in rng.integers(0, size, 4):
                smashed[int(position)] = int(rng.integers(256))
            files.append(FuzzFile(f"smash{i}_{seed.name}", bytes(smashed)))
    return files


def la_tiff(rng: np.random.Generator, width: int, height: int) -> bytes:
    """An 8-bit grayscale TIFF with associated (premultiplied) alpha: PIL mode ``La``."""
    alpha = rng.integers(0, 256, (height, width), dtype=np.uint16)
    straight = rng.integers(0, 256, (height, width), dtype=np.uint16)
    premultiplied = (straight * alpha + 127) // 255
    pixels = np.stack([premultiplied, alpha], axis=-1).astype(np.uint8).tobytes()
    return tiff_bytes(
        width, height, photometric=1, samples=2, bits=8, sample_format=1, extra=1, compression=1, pixels=pixels
    )


def all_nan_tiff() -> bytes:
    """A float32 TIFF whose every value is NaN (a camera that lost its calibration)."""
    return encode(Image.fromarray(np.full((20, 30), np.nan, dtype=np.float32)), "TIFF")


def fuzz_corpus() -> list[FuzzFile]:
    """The whole seeded corpus (deterministic)."""
    rng = np.random.default_rng(SEED)
    seeds = well_formed_files(rng)
    corpus = header_fuzz_tiffs(rng) + float_tiffs(rng) + header_fuzz_pngs(rng) + seeds
    corpus += mutated_files(rng, seeds, per_seed=12)
    names = [f.name for f in corpus]
    assert len(set(names)) == len(names), "fuzz file names must be unique"
    return corpus


def pil_sees_nonfinite_floats(data: bytes) -> bool:
    """Independent oracle: PIL decodes the file to a float image holding NaN or infinity."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.mode == "F" and not bool(np.isfinite(np.asarray(image)).all())
    except Exception:
        return False


def engine_transform() -> Preprocessor:
    """The transform the engine's loader applies (uint8 output, resize to ``SIDE``)."""
    config = PadimConfig(backbone="resnet18", weights="random", image_size=SIDE, channels=20)
    return Preprocessor(config, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), normalize=False)


def reason_class(reason: str) -> str:
    """The kind of a rejection: its reason up to the first parenthesis or colon."""
    return reason.split("(")[0].split(":")[0].strip()


@contextlib.contextmanager
def fail_after(seconds: int, fifo: Path | None = None) -> Iterator[None]:
    """Fail the test instead of hanging: SIGALRM after ``seconds``, releasing a reader of ``fifo``."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        if fifo is not None:
            with contextlib.suppress(OSError):  # opening the write end lets a blocked reader see EOF
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- the fuzz -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[FuzzFile, str, ImageRecord, bool]]:
    """Every fuzz file written and read: ``name -> (file, uri, record, decoded)``."""
    folder = tmp_path_factory.mktemp("fuzz")
    transform = engine_transform()
    outcomes = {}
    for item in fuzz_corpus():
        uri = str(folder / item.name)
        Path(uri).write_bytes(item.data)
        try:
            record, tensor = read_image_record(uri, transform, max_pixels=FUZZ_MAX_PIXELS)
        except Exception as exc:  # the point of the test: report the file, not just the traceback
            pytest.fail(f"{item.name}: {type(exc).__name__} escaped read_image_record: {exc}")
        if tensor is not None:
            assert tensor.shape == (3, SIDE, SIDE) and tensor.dtype == torch.uint8, item.name
        outcomes[item.name] = (item, uri, record, tensor is not None)
    return outcomes


def test_fuzzed_files_each_give_exactly_one_outcome(
    fuzz_outcomes: dict[str, tuple[FuzzFile, str, ImageRecord, bool]],
) -> None:
    assert len(fuzz_outcomes) >= 2000
    for name, (_, uri, record, decoded) in fuzz_outcomes.items():
        assert record.uri == uri, name
        assert not record.skipped, name
        if decoded:
            assert record.ok and record.width and record.height, name
        else:
            assert isinstance(record.error, str) and record.error.strip(), name
            assert record.sha256 is not None, name  # the bytes were read: a decode error, not a fault
    decoded = sum(1 for *_, ok in fuzz_outcomes.values() if ok)
    assert 0 < decoded < len(fuzz_outcomes)  # the corpus exercises both outcomes


def test_no_fuzzed_image_with_nan_or_infinity_is_accepted(
    fuzz_outcomes: dict[str, tuple[FuzzFile, str, ImageRecord, bool]],
) -> None:
    planted = {name for name in fuzz_outcomes if name.startswith(("float_one", "float_all"))}
    seen_by_pil = {name for name, (item, *_) in fuzz_outcomes.items() if pil_sees_nonfinite_floats(item.data)}
    assert len(planted) == 48
    for name in sorted(planted | seen_by_pil):
        record = fuzz_outcomes[name][2]
        assert record.error is not None and NONFINITE_REASON in record.error, (name, record.error)
    for name in fuzz_outcomes:
        if name.startswith(("float_unit", "float_wide")):
            assert fuzz_outcomes[name][3], (name, fuzz_outcomes[name][2].error)


def test_fuzzed_premultiplied_and_straight_alpha_tiffs_decode(
    fuzz_outcomes: dict[str, tuple[FuzzFile, str, ImageRecord, bool]],
) -> None:
    # 8-bit grayscale/RGB with associated (1: PIL's La/RGBa), unassociated (2) or unspecified (0)
    # extra samples: the crash class of the review (the layouts PIL reads; min-is-white has none).
    for photometric, samples in ((1, 2), (2, 4)):
        for extra in (0, 1, 2):
            matches = [n for n in fuzz_outcomes if n.startswith(f"hdr_pi{photometric}_s{samples}_b8_f1_x{extra}_")]
            assert len(matches) == 1
            _, _, record, decoded = fuzz_outcomes[matches[0]]
            if int(matches[0].split("_c")[1].split("_")[0]) != 5:  # LZW over raw bytes is corrupt
                assert decoded, (matches[0], record.error)


def test_fuzz_through_the_engine_loader_yields_every_file_once(
    fuzz_outcomes: dict[str, tuple[FuzzFile, str, ImageRecord, bool]],
) -> None:
    uris = [uri for _, uri, _, _ in fuzz_outcomes.values()][::7]
    seen: list[str] = []
    for batch in iter_batches(uris, engine_transform(), 64, num_workers=2, max_pixels=FUZZ_MAX_PIXELS):
        seen += [r.uri for r in batch.records] + [r.uri for r in batch.failed]
        assert not batch.skipped
    assert sorted(seen) == sorted(uris)


def test_fuzz_summary_by_reason_class(
    fuzz_outcomes: dict[str, tuple[FuzzFile, str, ImageRecord, bool]], capsys: pytest.CaptureFixture[str]
) -> None:
    classes = Counter(
        "decoded" if decoded else reason_class(record.error or "") for _, _, record, decoded in fuzz_outcomes.values()
    )
    with capsys.disabled():
        print(f"\nfuzz: {len(fuzz_outcomes)} files; " + "; ".join(f"{k}: {v}" for k, v in classes.most_common()))
    assert "" not in classes
    document = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text(encoding="utf-8")
    stated = f"| image files fuzzed (seed {SEED}), one outcome each | {len(fuzz_outcomes)} |"
    assert stated in document, f"docs/reliability.md must state {stated!r}"


# ---- every mode converts ------------------------------------------------------------------------


def mode_image(mode: str) -> Image.Image:
    """A small image of ``mode`` with varied pixel values (alpha included)."""
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (6, 9, 4), dtype=np.uint8))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        values = rng.integers(0, 65536, (6, 9), dtype=np.uint16)
        return Image.frombytes(mode, (9, 6), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    if mode == "I":
        return Image.fromarray(rng.integers(-5000, 90000, (6, 9), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(0, 3, (6, 9)).astype(np.float32))
    if mode == "La":
        return rgba.convert("LA").convert("La")
    if mode == "RGBa":
        return rgba.convert("RGBa")
    if mode == "PA":
        palette = rgba.convert("RGB").convert("P")
        return Image.merge("PA", (palette, rgba.getchannel("A")))  # type: ignore[arg-type]
    if mode == "P-transparent":
        palette = rgba.convert("RGB").convert("P")
        palette.info["transparency"] = 0
        return palette
    return rgba.convert("RGB").convert(mode)


CAMERA_MODES = (
    "L",
    "LA",
    "La",
    "P",
    "P-transparent",
    "PA",
    "I;16",
    "I;16B",
    "I;16L",
    "I;16N",
    "I",
    "F",
    "RGB",
    "RGBA",
    "RGBa",
    "RGBX",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "1",
)


@pytest.mark.parametrize("mode", CAMERA_MODES)
def test_every_camera_mode_converts_to_8bit_and_keep_gray_gives_the_same_tensor(mode: str) -> None:
    source = mode_image(mode)
    converted = decoding._to_gray_or_rgb(source)
    assert converted.mode in ("L", "RGB") and converted.size == source.size
    rgb = converted if converted.mode == "RGB" else converted.convert("RGB")
    transform = engine_transform()
    for config_transform in (transform, Preprocessor(PadimConfig(image_size=48, crop_size=40), (0.5,) * 3, (0.5,) * 3)):
        assert torch.equal(config_transform(converted), config_transform(rgb))


def test_premultiplied_alpha_matches_straight_alpha_composited_on_black() -> None:
    rng = np.random.default_rng(5)
    straight = Image.fromarray(rng.integers(0, 256, (5, 7, 4), dtype=np.uint8))
    straight.putpixel((0, 0), (200, 180, 160, 0))
    for straight_mode, premultiplied_mode in (("LA", "La"), ("RGBA", "RGBa")):
        plain = decoding._to_gray_or_rgb(straight.convert(straight_mode))
        premultiplied = decoding._to_gray_or_rgb(straight.convert(straight_mode).convert(premultiplied_mode))
        difference = np.abs(np.asarray(plain, dtype=int) - np.asarray(premultiplied, dtype=int))
        assert premultiplied.mode == plain.mode and difference.max() <= 1
        assert np.asarray(premultiplied)[0, 0].max() == 0  # transparent is black


def test_la_tiff_decodes_like_its_straight_alpha_png() -> None:
    rng = np.random.default_rng(6)
    data = la_tiff(rng, 13, 7)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "La"
    decoded = decode_image(data, "la.tif")
    gray = decode_image(data, "la.tif", keep_gray=True)
    assert (decoded.mode, decoded.size, gray.mode) == ("RGB", (13, 7), "L")
    values = np.frombuffer(data[8 : 8 + 13 * 7 * 2], dtype=np.uint8).reshape(7, 13, 2)
    assert np.abs(np.asarray(gray, dtype=int) - values[..., 0]).max() <= 1  # premultiplied = on black
    assert np.array_equal(np.asarray(decoded)[..., 0], np.asarray(gray))


def grey_float_tiff(values: np.ndarray, compression: int, big_endian: bool) -> bytes:
    """A 6 x 4 one-sample float32 TIFF of ``values`` in the given byte order."""
    return tiff_bytes(
        6,
        4,
        photometric=1,
        samples=1,
        bits=32,
        sample_format=3,
        extra=None,
        compression=compression,
        pixels=strip_bytes(values, 32, big_endian),
        big_endian=big_endian,
    )


@pytest.mark.parametrize("compression", [1, 8, 32773])
def test_big_endian_float_tiffs_decode_like_little_endian_ones(compression: int) -> None:
    # Pillow unpacks libtiff's native-order floats as big-endian again (finite garbage, NaN hidden).
    values = np.linspace(0.0, 1.0, 24, dtype=np.float32)
    decoded = [
        np.asarray(decode_image(grey_float_tiff(values, compression, big_endian), "f.tif"))
        for big_endian in (False, True)
    ]
    assert np.array_equal(decoded[0], decoded[1])
    assert decoded[0][0, :, 0].tolist() == np.rint(values[:6] * 255).astype(int).tolist()
    nan_values = values.copy()
    nan_values[5] = np.nan
    with pytest.raises(ImageDecodeError, match=NONFINITE_REASON):
        decode_image(grey_float_tiff(nan_values, compression, True), "nan.tif")


@pytest.mark.parametrize("content", ["all-nan", "one-nan", "one-inf", "all-neg-inf"])
def test_float_tiff_with_nan_or_infinity_is_rejected(content: str) -> None:
    values = float_values(np.random.default_rng(7), content, 40).reshape(5, 8)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(encode(Image.fromarray(values), "TIFF"), "cam7.tif")
    assert NONFINITE_REASON in caught.value.reason  # type: ignore[attr-defined]
    assert "cam7.tif" in str(caught.value)


def test_any_exception_while_converting_becomes_the_files_decode_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(image: Image.Image) -> Image.Image:
        raise ValueError("conversion from La to L not supported")

    monkeypatch.setattr(decoding, "_to_gray_or_rgb", broken)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), "night/cam3.png")
    assert "cam3.png" in str(caught.value)
    assert "conversion from La to L not supported" in caught.value.reason  # type: ignore[attr-defined]


# ---- special files ------------------------------------------------------------------------------


def test_fifo_socket_and_device_are_not_listed_and_never_block_a_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    fifo = tmp_path / "cam.png"
    os.mkfifo(fifo)
    device = tmp_path / "dev.png"
    device.symlink_to(os.devnull)
    special = [fifo, device]
    with contextlib.closing(socket.socket(socket.AF_UNIX)) as sock:
        sock_path = tmp_path / "s.png"
        if len(str(sock_path)) < 100:  # AF_UNIX path length limit
            sock.bind(str(sock_path))
            special.append(sock_path)
        with fail_after(20, fifo), caplog.at_level("WARNING", logger="padim.io.listing"):
            assert list_images(str(tmp_path)) == [str(good)]
            for path in special:
                assert str(path) in caplog.text
                record, tensor = read_image_record(str(path), engine_transform())
                assert tensor is None and record.error is not None and "not a regular file" in record.error
                with pytest.raises(ImageDecodeError, match="not a regular file"):
                    load_pil(str(path))


def test_fifo_in_the_loader_fails_fast(tmp_path: Path) -> None:
    fifo = tmp_path / "stuck.png"
    os.mkfifo(fifo)
    with fail_after(20, fifo):
        batches = list(iter_batches([str(fifo)], engine_transform(), 4, num_workers=2))
    assert [r.error for r in batches[0].failed] == ["not a regular file (a FIFO, socket or device)"]


# ---- a night, end to end --------------------------------------------------------------------------


def test_a_night_with_bad_files_scores_one_result_per_file(tmp_path: Path) -> None:
    config = PadimConfig(backbone="resnet18", weights="random", image_size=SIDE, channels=20)
    fitter = PadimFitter(config, device="cpu")
    fitter.update(torch.randn(6, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)))
    model = build_model(fitter)
    rng = np.random.default_rng(8)
    night = tmp_path / "night"
    night.mkdir()
    for i in range(3):
        pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
        (night / f"good{i}.png").write_bytes(encode(Image.fromarray(pixels), "PNG"))
    (night / "premultiplied.tif").write_bytes(la_tiff(rng, 50, 40))
    (night / "nan.tif").write_bytes(all_nan_tiff())
    (night / "truncated.png").write_bytes(encode(Image.fromarray(pixels), "PNG")[:-300])
    os.mkfifo(night / "pipe.png")
    with fail_after(60, night / "pipe.png"):
        uris = list_images(str(night))
        results = list(score_images(model, uris, batch_size=2, num_workers=2, keep_maps="none"))
    names = [Path(u).name for u in uris]
    assert names == ["good0.png", "good1.png", "good2.png", "nan.tif", "premultiplied.tif", "truncated.png"]
    assert [r.record.uri for r in results] == uris
    outcome = {Path(r.record.uri).name: r for r in results}
    for name in ("good0.png", "good1.png", "good2.png", "premultiplied.tif"):
        assert outcome[name].ok and np.isfinite(outcome[name].score), (name, outcome[name].record.error)
    assert not outcome["nan.tif"].ok and NONFINITE_REASON in (outcome["nan.tif"].record.error or "")
    assert not outcome["truncated.png"].ok and "truncated or corrupt" in (outcome["truncated.png"].record.error or "")
