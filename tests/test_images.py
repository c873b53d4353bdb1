"""Tests for padim.io.listing, decoding and loading: listing, decoding every kind of file, background loading."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageFile

from padim.errors import ConfigError, ImageDecodeError, ImageSourceError
from padim.io.decoding import decode_image
from padim.io.fsio import url_to_fs
from padim.io.listing import list_images
from padim.io.loading import ImageRecord, default_num_workers, iter_batches, load_pil, read_image_record
from tests.s3_server import s3_bucket, s3_endpoint  # noqa: F401

SIDE = 16


# ---- builders -----------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    """Encode a PIL image to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def rgb_png(width: int = 24, height: int = 12, colour: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    """A small solid RGB PNG."""
    return encode(Image.new("RGB", (width, height), colour), "PNG")


def noisy_jpeg(width: int = 64, height: int = 64) -> bytes:
    """A JPEG with enough entropy that truncation cuts real scan data."""
    pixels = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width/height of a PNG (and its CRC): a decompression-bomb header."""
    ihdr_start = 8
    length = struct.unpack(">I", data[ihdr_start : ihdr_start + 4])[0]
    body = bytearray(data[ihdr_start + 8 : ihdr_start + 8 + length])
    body[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)) & 0xFFFFFFFF)
    return data[: ihdr_start + 8] + bytes(body) + crc + data[ihdr_start + 12 + length :]


def header_only_png() -> bytes:
    """PNG signature and IHDR chunk, nothing else."""
    data = rgb_png()
    return data[: data.find(b"IDAT") - 4]


def crc_corrupt_png() -> bytes:
    """A PNG whose IDAT payload has one flipped byte (CRC mismatch)."""
    pixels = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = bytearray(encode(Image.fromarray(pixels), "PNG"))
    position = data.find(b"IDAT") + 4 + 20
    data[position] ^= 0xFF
    return bytes(data)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """Test transform: resize to SIDE x SIDE, return (3, SIDE, SIDE) float32 in [0, 1]."""
    array = np.asarray(image.resize((SIDE, SIDE)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def write(path: Path, data: bytes) -> str:
    """Write bytes, creating folders; return the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


BAD_FILES: dict[str, tuple[bytes, str]] = {
    "zero-bytes": (b"", "empty file (0 bytes)"),
    "truncated-png": (rgb_png(300, 200)[:-40], "truncated or corrupt"),
    "truncated-jpeg": (noisy_jpeg()[:1500], "truncated or corrupt"),
    "random-bytes": (np.random.default_rng(0).bytes(2048), "not an image (unrecognised file format)"),
    "text-file": (b"serial,score\n1,0.5\n2,0.7\n", "not an image (looks like a text file)"),
    "header-only-png": (header_only_png(), "corrupt PNG file"),
    "crc-corrupt-png": (crc_corrupt_png(), "corrupt PNG"),
    "bomb-header": (png_with_size(rgb_png(), 9000, 9000), "image too large: 9000x9000"),
    "gif": (encode(Image.new("P", (4, 4)), "GIF"), "unsupported image format (GIF)"),
}


# ---- listing ------------------------------------------------------------------------------------


def make_tree(root: Path) -> list[str]:
    """Create a nested folder with images, non-images and hidden files; return expected URIs."""
    expected = [
        write(root / "a.png", rgb_png()),
        write(root / "B.JPG", noisy_jpeg()),
        write(root / "sub" / "c.Jpeg", noisy_jpeg()),
        write(root / "sub" / "deeper" / "d.TIFF", encode(Image.new("RGB", (5, 5)), "TIFF")),
        write(root / "sub" / "e.bmp", encode(Image.new("RGB", (5, 5)), "BMP")),
        write(root / "z.tif", encode(Image.new("L", (5, 5)), "TIFF")),
    ]
    write(root / "notes.txt", b"hello")
    write(root / "anim.gif", encode(Image.new("P", (4, 4)), "GIF"))
    write(root / "noext", rgb_png())
    write(root / ".hidden" / "x.png", rgb_png())
    write(root / "sub" / "._a.png", b"\x00\x05\x16\x07 resource fork")
    return sorted(expected)


def test_list_images_local_recursive_case_insensitive_sorted(tmp_path: Path) -> None:
    expected = make_tree(tmp_path / "imgs")
    found = list_images(str(tmp_path / "imgs"))
    assert found == expected
    assert all(os.path.isabs(uri) for uri in found)
    assert found == sorted(found)


def test_list_images_extension_filter_and_hidden(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert list_images(str(tmp_path), extensions=(".PNG",)) == [str(tmp_path / "a.png")]
    assert [Path(u).name for u in list_images(str(tmp_path), extensions=["jpg", "jpeg"])] == [
        "B.JPG",
        "c.Jpeg",
    ]
    with_hidden = list_images(str(tmp_path), extensions=("png",), include_hidden=True)
    assert str(tmp_path / ".hidden" / "x.png") in with_hidden
    assert str(tmp_path / "sub" / "._a.png") in with_hidden


def test_list_images_relative_and_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = make_tree(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    assert list_images("imgs") == expected
    assert list_images(f"file://{tmp_path / 'imgs'}") == expected


def test_list_images_missing_empty_and_file(tmp_path: Path) -> None:
    with pytest.raises(ImageSourceError, match=r"no such folder: .*missing"):
        list_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert list_images(str(tmp_path / "empty")) == []
    single = write(tmp_path / "one.png", rgb_png())
    with pytest.raises(ImageSourceError, match="not a folder"):
        list_images(single)
    with pytest.raises(ConfigError, match="extension"):
        list_images(str(tmp_path), extensions=())


def test_list_images_s3(s3_bucket: str) -> None:  # noqa: F811
    fs, _ = url_to_fs(s3_bucket)
    bucket = s3_bucket.removeprefix("s3://")
    keys = ["good/z.png", "good/A.PNG", "good/sub/b.jpg", "good/sub/deep/c.TiF", "good/readme.md"]
    for key in keys:
        fs.pipe_file(f"{bucket}/{key}", rgb_png())
    fs.pipe_file(f"{bucket}/other/x.png", rgb_png())
    found = list_images(f"{s3_bucket}/good")
    assert found == [
        f"{s3_bucket}/good/A.PNG",
        f"{s3_bucket}/good/sub/b.jpg",
        f"{s3_bucket}/good/sub/deep/c.TiF",
        f"{s3_bucket}/good/z.png",
    ]
    assert list_images(f"{s3_bucket}/good/", extensions=("png",)) == [
        f"{s3_bucket}/good/A.PNG",
        f"{s3_bucket}/good/z.png",
    ]
    with pytest.raises(ImageSourceError, match="no such folder"):
        list_images(f"{s3_bucket}/nothing-here")


# ---- decoding: supported kinds ------------------------------------------------------------------


def test_decode_rgb_grayscale_palette_bitonal_bmp() -> None:
    rgb = decode_image(rgb_png(24, 12, (10, 200, 30)), "rgb.png")
    assert (rgb.mode, rgb.size, rgb.getpixel((3, 3))) == ("RGB", (24, 12), (10, 200, 30))

    gray = decode_image(encode(Image.new("L", (7, 5), 90), "PNG"), "l.png")
    assert (gray.mode, gray.size, gray.getpixel((1, 1))) == ("RGB", (7, 5), (90, 90, 90))

    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 250, 20, 10] + [0] * 762)
    decoded = decode_image(encode(palette, "PNG"), "p.png")
    assert (decoded.mode, decoded.size, decoded.getpixel((2, 2))) == ("RGB", (6, 4), (250, 20, 10))

    bitonal = Image.new("1", (9, 3), 0)
    bitonal.putpixel((8, 2), 1)
    decoded = decode_image(encode(bitonal, "PNG"), "1.png")
    assert decoded.size == (9, 3)
    assert decoded.getpixel((8, 2)) == (255, 255, 255)
    assert decoded.getpixel((0, 0)) == (0, 0, 0)

    bmp = decode_image(encode(Image.new("RGB", (5, 3), (1, 2, 3)), "BMP"), "x.bmp")
    assert (bmp.size, bmp.getpixel((0, 0))) == ((5, 3), (1, 2, 3))


def test_decode_alpha_composited_on_black() -> None:
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (200, 200, 200, 0))
    rgba.putpixel((1, 0), (200, 100, 50, 128))
    decoded = decode_image(encode(rgba, "PNG"), "rgba.png")
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (0, 0, 0)
    assert decoded.getpixel((3, 1)) == (10, 20, 30)
    half = decoded.getpixel((1, 0))
    assert all(abs(a - b) <= 1 for a, b in zip(half, (100, 50, 25), strict=True))

    la = Image.new("LA", (3, 3), (120, 255))
    la.putpixel((0, 0), (250, 0))
    decoded = decode_image(encode(la, "PNG"), "la.png")
    assert decoded.getpixel((0, 0)) == (0, 0, 0)
    assert decoded.getpixel((2, 2)) == (120, 120, 120)

    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    decoded = decode_image(encode(palette, "PNG", transparency=0), "pt.png")
    assert decoded.getpixel((0, 0)) == (0, 0, 0)
    assert decoded.getpixel((1, 1)) == (0, 255, 0)


def test_decode_16bit_scaled_by_full_range() -> None:
    values = np.array([[0, 257 * 100, 65535], [1000, 2000, 3000]], dtype=np.uint16)
    source = Image.fromarray(values)
    assert source.mode.startswith("I;16")
    for fmt in ("PNG", "TIFF"):
        decoded = decode_image(encode(source, fmt), f"16.{fmt.lower()}")
        assert decoded.mode == "RGB"
        assert decoded.size == (3, 2)
        gray = np.asarray(decoded)[..., 0]
        assert gray.tolist() == [[0, 100, 255], [4, 8, 12]]


def test_decode_float_and_int32_images() -> None:
    floats = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))
    decoded = decode_image(encode(floats, "TIFF"), "f.tif")
    assert np.asarray(decoded)[0, :, 1].tolist() == [0, 64, 255]

    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32))
    assert wide.mode == "I"
    decoded = decode_image(encode(wide, "TIFF"), "i.tif")
    assert np.asarray(decoded)[0, :, 2].tolist() == [0, 128, 255]


def test_decode_cmyk_jpeg_and_tiff() -> None:
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))
    for fmt in ("JPEG", "TIFF"):
        decoded = decode_image(encode(cmyk, fmt), f"cmyk.{fmt.lower()}")
        assert (decoded.mode, decoded.size) == ("RGB", (8, 6))
        red, green, blue = decoded.getpixel((4, 3))
        assert red > 240 and green < 15 and blue < 15


def test_decode_applies_exif_orientation() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), "rot.jpg")
    assert decoded.size == (20, 40)
    top, bottom = decoded.getpixel((10, 5)), decoded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_record_size_is_after_exif_rotation(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(image, "JPEG", exif=exif.tobytes())
    uri = write(tmp_path / "r.jpg", data)
    record, tensor = read_image_record(uri, to_tensor)
    assert record == ImageRecord(uri=uri, sha256=hashlib.sha256(data).hexdigest(), width=20, height=40)
    assert tensor is not None and tensor.shape == (3, SIDE, SIDE)
    assert load_pil(uri).size == (20, 40)


# ---- decoding: bad kinds ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_files_raise_decode_error_with_reason(kind: str) -> None:
    data, reason = BAD_FILES[kind]
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, f"s3://bucket/{kind}.png")
    assert reason in caught.value.reason  # type: ignore[attr-defined]
    assert f"s3://bucket/{kind}.png" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_pil_decompression_bomb_error_becomes_decode_error() -> None:
    huge = png_with_size(rgb_png(), 30000, 30000)  # > 2 x PIL's MAX_IMAGE_PIXELS
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(huge, "huge.png", max_pixels=10**12)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485 or Image.MAX_IMAGE_PIXELS is None


def test_max_pixels_checked_before_decoding() -> None:
    data = rgb_png(20, 20)
    assert decode_image(data, "ok.png", max_pixels=400).size == (20, 20)
    with pytest.raises(ImageDecodeError, match="20x20 = 400 pixels exceeds the limit of 399"):
        decode_image(data, "big.png", max_pixels=399)


def test_truncated_files_rejected_even_if_pil_accepts_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageDecodeError, match="corrupt PNG"):
        decode_image(rgb_png(300, 200)[:-40], "t.png")
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_image(noisy_jpeg()[:1500], "t.jpg")
    assert decode_image(noisy_jpeg(), "fine.jpg").size == (64, 64)


def test_unreadable_files_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = write(tmp_path / "locked.png", rgb_png())
    folder = tmp_path / "folder.png"
    folder.mkdir()
    original = LocalFileSystem.cat_file

    def deny(self: LocalFileSystem, path: str, *args: object, **kwargs: object) -> bytes:
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", path)
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", deny)
    record, tensor = read_image_record(locked, to_tensor)
    assert (record.error, record.sha256, tensor) == ("permission denied", None, None)
    record, _ = read_image_record(str(folder), to_tensor)
    assert record.error == "is a folder, not a file"
    record, _ = read_image_record(str(tmp_path / "gone.png"), to_tensor)
    assert record.error is not None and record.error.startswith("file not found")
    with pytest.raises(ImageDecodeError, match="permission denied"):
        load_pil(locked)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_chmod_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    write(path, rgb_png())
    path.chmod(0)
    record, _ = read_image_record(str(path), to_tensor)
    assert record.error == "permission denied"


# ---- background loader --------------------------------------------------------------------------


def test_loader_skips_bad_files_and_keeps_order(tmp_path: Path) -> None:
    uris: list[str] = []
    good: list[str] = []
    for index, kind in enumerate(sorted(BAD_FILES)):
        good_uri = write(tmp_path / f"{index:02d}-good.png", rgb_png(10 + index, 8, (index * 10, 0, 0)))
        bad_uri = write(tmp_path / f"{index:02d}-{kind}.png", BAD_FILES[kind][0])
        uris += [good_uri, bad_uri]
        good.append(good_uri)
    batches = list(iter_batches(uris, to_tensor, batch_size=4, num_workers=3, prefetch=1))
    assert len(batches) == (len(uris) + 3) // 4
    out = [r.uri for b in batches for r in b.records]
    failed = {r.uri: r for b in batches for r in b.failed}
    assert out == good
    assert len(failed) == len(BAD_FILES)
    for kind, (data, reason) in BAD_FILES.items():
        (record,) = [r for u, r in failed.items() if u.endswith(f"-{kind}.png")]
        assert record.error is not None and reason in record.error
        assert record.sha256 == hashlib.sha256(data).hexdigest()
    for batch in batches:
        assert batch.images is not None
        assert batch.images.shape == (len(batch.records), 3, SIDE, SIDE)
        assert batch.images.dtype == torch.float32
        for row, record in enumerate(batch.records):
            index = int(Path(record.uri).name[:2])
            assert record.width == 10 + index and record.height == 8
            assert batch.images[row, 0, 0, 0].item() == pytest.approx(index * 10 / 255)


def test_loader_all_failed_batch_has_no_images(tmp_path: Path) -> None:
    bad = [write(tmp_path / f"bad{i}.png", b"") for i in range(3)]
    good = write(tmp_path / "good.png", rgb_png())
    batches = list(iter_batches([*bad, good], to_tensor, batch_size=3, num_workers=2))
    assert batches[0].images is None and batches[0].records == [] and len(batches[0].failed) == 3
    assert len(batches[0]) == 0
    assert batches[1].images is not None and batches[1].images.shape == (1, 3, SIDE, SIDE)


def test_loader_order_is_deterministic_under_scrambled_timing(tmp_path: Path) -> None:
    uris = [write(tmp_path / f"{i:03d}.png", rgb_png(8, 8, (i, 0, 0))) for i in range(40)]
    rng = np.random.default_rng(3)
    delays = {uri: float(d) for uri, d in zip(uris, rng.uniform(0, 0.01, len(uris)), strict=True)}

    def slow(image: Image.Image) -> torch.Tensor:
        time.sleep(delays[uris[image.getpixel((0, 0))[0]]])
        return to_tensor(image)

    batches = list(iter_batches(iter(uris), slow, batch_size=7, num_workers=8, prefetch=3, pin_memory=True))
    assert [r.uri for b in batches for r in b.records] == uris
    reds = torch.cat([b.images[:, 0, 0, 0] for b in batches if b.images is not None])
    assert torch.allclose(reds * 255, torch.arange(40, dtype=torch.float32), atol=1e-3)


def test_loader_prefetches_ahead_while_consumer_works(tmp_path: Path) -> None:
    uris = [write(tmp_path / f"{i:03d}.png", rgb_png()) for i in range(40)]
    calls: list[int] = []
    lock = threading.Lock()

    def counting(image: Image.Image) -> torch.Tensor:
        with lock:
            calls.append(1)
        return to_tensor(image)

    batch_size, prefetch = 4, 2
    loader = iter_batches(uris, counting, batch_size=batch_size, num_workers=4, prefetch=prefetch)
    first = next(loader)
    assert len(first) == batch_size
    deadline = time.monotonic() + 5
    while len(calls) < (prefetch + 1) * batch_size and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    # Batches 1..prefetch were decoded while the consumer held batch 0, and no more (bounded).
    assert len(calls) == (prefetch + 1) * batch_size
    loader.close()
    time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith(("padim-decode", "padim-collate"))]


def test_loader_transform_failure_and_shape_errors(tmp_path: Path) -> None:
    uris = [write(tmp_path / f"{i}.png", rgb_png(10 + i, 10)) for i in range(3)]

    def picky(image: Image.Image) -> torch.Tensor:
        if image.width == 11:
            raise ValueError("cannot handle width 11")
        return to_tensor(image)

    (batch,) = list(iter_batches(uris, picky, batch_size=3, num_workers=2))
    assert [r.uri for r in batch.records] == [uris[0], uris[2]]
    assert batch.failed[0].error == "transform failed (ValueError: cannot handle width 11)"
    assert batch.failed[0].width == 11

    def unsized(image: Image.Image) -> torch.Tensor:
        return torch.zeros(3, image.height, image.width)

    with pytest.raises(ConfigError, match="different shapes"):
        list(iter_batches(uris, unsized, batch_size=3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"batch_size": 0}, "batch_size"), ({"num_workers": 0}, "num_workers"), ({"prefetch": -1}, "prefetch")],
)
def test_loader_rejects_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    arguments = {"batch_size": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        next(iter_batches(["x.png"], to_tensor, **arguments))


def test_loader_reads_from_s3(s3_bucket: str) -> None:  # noqa: F811
    fs, _ = url_to_fs(s3_bucket)
    bucket = s3_bucket.removeprefix("s3://")
    payloads = {
        "line1/ok-1.png": rgb_png(12, 6, (50, 60, 70)),
        "line1/ok-2.JPG": noisy_jpeg(32, 16),
        "line1/sub/broken.png": rgb_png()[:30],
        "line1/sub/ok-3.tif": encode(Image.new("RGB", (9, 9), (1, 2, 3)), "TIFF"),
    }
    for key, data in payloads.items():
        fs.pipe_file(f"{bucket}/{key}", data)
    uris = list_images(f"{s3_bucket}/line1")
    assert all(uri.startswith("s3://") for uri in uris)
    batches = list(iter_batches(uris, to_tensor, batch_size=8, num_workers=4))
    (batch,) = batches
    assert [r.uri.rsplit("/", 1)[-1] for r in batch.records] == ["ok-1.png", "ok-2.JPG", "ok-3.tif"]
    for record in batch.records:
        key = record.uri.removeprefix(f"{s3_bucket}/")
        assert record.sha256 == hashlib.sha256(payloads[key]).hexdigest()
    assert [(r.width, r.height) for r in batch.records] == [(12, 6), (32, 16), (9, 9)]
    assert batch.failed[0].uri == f"{s3_bucket}/line1/sub/broken.png"
    assert batch.failed[0].error is not None and "corrupt" in batch.failed[0].error
    assert load_pil(f"{s3_bucket}/line1/ok-1.png").getpixel((0, 0)) == (50, 60, 70)
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_pil(f"{s3_bucket}/line1/missing.png")


def test_default_workers_positive() -> None:
    assert 1 <= default_num_workers() <= 16


# ---- decoding speed-ups that must not change a pixel -------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_plain_pngs_inflated_by_libspng_equal_pils_pixels(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import padim.io.decoding

    pytest.importorskip("pyspng")
    rng = np.random.default_rng(11)
    shape = (37, 53, 3) if mode == "RGB" else (37, 53)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG", compress_level=6)
    data = buffer.getvalue()
    calls: list[int] = []
    real = padim.io.decoding._spng.load
    monkeypatch.setattr(padim.io.decoding._spng, "load", lambda d: calls.append(1) or real(d))

    fast = decode_image(data, "x.png", keep_gray=True)

    assert calls == [1] and fast.mode == mode
    assert np.array_equal(np.asarray(fast), pixels)
    monkeypatch.setattr(padim.io.decoding, "_spng", None)  # PIL's own decoder
    slow = decode_image(data, "x.png", keep_gray=True)
    assert np.array_equal(np.asarray(slow), np.asarray(fast))


def test_pngs_with_transparency_or_palette_keep_pils_path() -> None:
    import padim.io.decoding

    rgba = Image.fromarray(np.full((8, 8, 4), 200, dtype=np.uint8), mode="RGBA")
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").convert("P")
    for image in (rgba, palette):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        with Image.open(io.BytesIO(buffer.getvalue())) as opened:
            assert padim.io.decoding._inflate_plain_png(opened, buffer.getvalue()) is None


def test_grayscale_images_resized_before_the_channel_copy_give_the_same_tensor(shared_dir: Path) -> None:
    from padim.core.config import PadimConfig
    from padim.core.preprocessing import Preprocessor

    files = sorted((shared_dir / "datasets" / "magnetic_tile" / "train" / "good").glob("*.jpg"))[:5]
    rng = np.random.default_rng(12)
    generated = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (301, 247), dtype=np.uint8), mode="L").save(generated, format="JPEG")
    blobs = [generated.getvalue(), *(f.read_bytes() for f in files)]
    for config in (PadimConfig(), PadimConfig(image_size=256, crop_size=224)):
        transform = Preprocessor(config, (0.5,) * 3, (0.5,) * 3, normalize=False)
        for data in blobs:
            gray = decode_image(data, "x.jpg", keep_gray=True)
            assert gray.mode == "L"
            assert torch.equal(transform(gray), transform(decode_image(data, "x.jpg")))
