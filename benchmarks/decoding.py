"""Decoding and resizing: PIL against the faster routes the loader takes, on the shared data sets.

One thread, files already in memory (reading is not measured), best of ``--repeats``:

* ``png_*``: MVTec bottle's 900 x 900 RGB PNGs: PIL's decoder, libspng (``pyspng``), and padim's
  whole decode (header checks, CRC walk, decode) and decode + transform to the 224 x 224 input;
* ``jpeg_*``: magnetic tile's grayscale JPEGs: PIL's decode + RGB conversion + resize in that order
  (the old path) and resize before the channel copy (the new one), and padim's decode + transform;
* ``*_opencv_*`` (when OpenCV is installed): ``cv2.imdecode`` and its area resize;
* ``jpeg_draft_*``: PIL's JPEG draft mode (DCT-domain downscaling by 2, 4 or 8 while decoding) is
  only usable for an image at least twice the target side; the share of such images is printed.

Every route is checked for giving the same pixels as the reference (``identical`` in the JSON).

    python benchmarks/decoding.py
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from padim.core.config import PadimConfig
from padim.core.preprocessing import Preprocessor
from padim.io.decoding import decode_image

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def rate(step: Callable[[bytes], Any], blobs: list[bytes], repeats: int) -> float:
    """Best images/s of ``step`` over all blobs."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for blob in blobs:
            step(blob)
        best = max(best, len(blobs) / (time.perf_counter() - start))
    return best


def pil_pixels(blob: bytes) -> np.ndarray:
    """PIL's decode, fully loaded."""
    with Image.open(io.BytesIO(blob)) as image:
        image.load()
        return np.asarray(image)


def opencv_routes(
    pngs: list[bytes], jpegs: list[bytes], size: tuple[int, int], transform: Preprocessor
) -> dict[str, tuple[Callable[[bytes], Any], bool]]:
    """OpenCV's decoders and resizes, when ``cv2`` is importable (it is not a dependency).

    ``identical`` is whether the pixels equal padim's within one grey level: OpenCV's decoders give
    PIL's pixels, but neither of its resizes (bilinear without antialiasing, area) is PIL's
    antialiased bilinear, so its decode + resize route is reported with the largest difference.
    """
    try:
        import cv2
    except ImportError:
        print(json.dumps({"route": "opencv", "skipped": "cv2 is not installed"}), flush=True)
        return {}
    cv2.setNumThreads(1)

    def decode(blob: bytes) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)

    def decode_resize(blob: bytes) -> np.ndarray:
        return cv2.resize(decode(blob), size, interpolation=cv2.INTER_AREA)

    def ours(blob: bytes, name: str) -> np.ndarray:
        return transform(decode_image(blob, name, keep_gray=True)).numpy().transpose(1, 2, 0)

    same_png = all(np.array_equal(decode(b)[..., ::-1], pil_pixels(b)) for b in pngs)
    same_jpeg = all(np.array_equal(decode(b), pil_pixels(b)) for b in jpegs)
    gap = max(
        int(np.abs(decode_resize(b)[..., ::-1].astype(int) - ours(b, "x.png").astype(int)).max()) for b in pngs[:10]
    )
    print(json.dumps({"route": "png_opencv_area_resize_max_grey_level_difference", "value": gap}), flush=True)
    return {
        "png_opencv_decode": (decode, same_png),
        "png_opencv_decode_resize_area": (decode_resize, gap <= 1),
        "jpeg_opencv_decode": (decode, same_jpeg),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print one JSON line per route."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=DATASETS)
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    transform = Preprocessor(PadimConfig(), (0.5,) * 3, (0.5,) * 3, normalize=False)
    size = (PadimConfig().image_size,) * 2

    pngs = [p.read_bytes() for p in sorted((args.datasets / "mvtec_bottle" / "train" / "good").glob("*.png"))]
    pngs = pngs[: args.limit]
    import pyspng

    same = all(np.array_equal(pyspng.load(b), pil_pixels(b)) for b in pngs)
    routes: dict[str, tuple[Callable[[bytes], Any], bool]] = {
        "png_pil_decode": (pil_pixels, True),
        "png_libspng_decode": (pyspng.load, same),
        "png_padim_decode": (lambda b: decode_image(b, "x.png"), True),
        "png_padim_decode_transform": (lambda b: transform(decode_image(b, "x.png", keep_gray=True)), True),
    }

    jpegs = [p.read_bytes() for p in sorted((args.datasets / "magnetic_tile" / "train" / "good").glob("*.jpg"))]
    jpegs = jpegs[: args.limit * 4]

    def rgb_first(blob: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(blob)) as image:
            return np.asarray(image.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=None))

    def gray_first(blob: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(blob)) as image:
            return np.asarray(image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None).convert("RGB"))

    same_jpeg = all(np.array_equal(rgb_first(b), gray_first(b)) for b in jpegs)
    routes.update(
        {
            "jpeg_pil_decode": (pil_pixels, True),
            "jpeg_rgb_then_resize": (rgb_first, True),
            "jpeg_resize_then_rgb": (gray_first, same_jpeg),
            "jpeg_padim_decode_transform": (lambda b: transform(decode_image(b, "x.jpg", keep_gray=True)), True),
        }
    )
    routes.update(opencv_routes(pngs, jpegs, size, transform))
    for name, (step, identical) in routes.items():
        blobs = pngs if name.startswith("png") else jpegs
        print(json.dumps({"route": name, "images": len(blobs), "images_per_s": rate(step, blobs, args.repeats),
                          "identical": identical}), flush=True)  # fmt: skip
    sides = [min(Image.open(io.BytesIO(b)).size) for b in jpegs]
    draftable = sum(side >= 2 * size[0] for side in sides) / len(sides)
    print(json.dumps({"route": "jpeg_draft_applicable_share", "share": draftable}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
