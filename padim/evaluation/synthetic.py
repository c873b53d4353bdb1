"""A small synthetic product data set for the demo and the tests: a textured surface with defects.

Nothing is downloaded: every image is generated from a seed. The surface is brushed metal with a
faint woven pattern (smoothed, direction-dependent noise plus a periodic pattern), and each image
gets a random shift of the pattern, a brightness and contrast change, a slight illumination
gradient and fresh grain, so that no two normal images are alike. Defective images carry one of
three kinds of defect, each with its ground-truth mask:

* ``scratch`` - a thin straight line, darker or brighter than the surface;
* ``spot`` - a soft elliptical blob (a stain or a dent);
* ``crack`` - a dark random-walk polyline.

Layout written by :func:`make_demo_dataset` (MVTec AD layout, so ``padim evaluate`` reads it, plus a
flat "night" folder as a production line would deliver it)::

    ROOT/train/good/000.png ...                 normal images to train on
    ROOT/test/good/000.png ...                  normal images of the night
    ROOT/test/<kind>/000.png ...                defective images of the night
    ROOT/ground_truth/<kind>/000_mask.png ...   their masks (255 = defect)
    ROOT/night/<kind>_000.png ...               the same night as one flat folder (good_000.png ...)
    ROOT/night_masks/<kind>_000_mask.png ...    the masks of the defective night images

Defects are kept inside the central 7/8 of the image, the part the default centre crop keeps.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "DEFECT_KINDS",
    "NORMAL_KIND",
    "DemoDataset",
    "make_defect",
    "make_demo_dataset",
    "make_surface",
]

NORMAL_KIND = "good"
DEFECT_KINDS: tuple[str, ...] = ("scratch", "spot", "crack")
DEFAULT_SIZE = 256

_BASE_COLOUR = np.array([0.52, 0.54, 0.57], dtype=np.float32)
_WEAVE_PERIOD = 16.0
_SAFE_MARGIN = 0.16
"""Share of the side kept free of defects on every border (the crop removes 1/16 per side)."""


@dataclass(frozen=True)
class DemoDataset:
    """Where :func:`make_demo_dataset` wrote the data set.

    Attributes:
        root: The data set folder (MVTec layout).
        train_dir: Normal training images (``root/train/good``).
        night_dir: The night's images in one flat folder (``root/night``).
        night_masks_dir: Masks of the night's defective images (``root/night_masks``).
        labels: Kind of every night image by file name (``"good_000.png" -> "good"``).
    """

    root: Path
    train_dir: Path
    night_dir: Path
    night_masks_dir: Path
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def n_defective(self) -> int:
        """Number of defective night images."""
        return sum(kind != NORMAL_KIND for kind in self.labels.values())


def make_surface(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Draw one image of the normal surface.

    Args:
        rng: Random generator (the image is a deterministic function of its state).
        size: Side of the square image in pixels.

    Returns:
        RGB image as float32 in ``[0, 1]``, shape ``(size, size, 3)``.
    """
    pad = 24
    noise = rng.standard_normal((size + 2 * pad, size + 2 * pad)).astype(np.float32)
    brushed = ndimage.gaussian_filter(noise, sigma=(0.7, 10.0), mode="wrap")[pad:-pad, pad:-pad]
    brushed /= float(brushed.std()) + 1e-6
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = rng.uniform(0.0, _WEAVE_PERIOD, size=2)
    weave = np.sin(2 * np.pi * (x + dx) / _WEAVE_PERIOD) * np.sin(2 * np.pi * (y + dy) / _WEAVE_PERIOD)
    angle = rng.uniform(0.0, 2 * np.pi)
    gradient = (np.cos(angle) * (x / size - 0.5) + np.sin(angle) * (y / size - 0.5)) * rng.uniform(0.0, 0.06)
    grain = rng.normal(0.0, 0.012, size=(size, size)).astype(np.float32)
    contrast = rng.uniform(0.85, 1.15)
    luminance = contrast * (0.045 * brushed + 0.035 * weave) + gradient + grain
    brightness = rng.uniform(0.92, 1.08)
    image = brightness * _BASE_COLOUR[None, None, :] + luminance[:, :, None]
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _line_mask(size: int, points: np.ndarray, width: float) -> np.ndarray:
    """Soft mask (0..1) of a polyline of the given width, anti-aliased."""
    canvas = Image.new("L", (size * 4, size * 4), 0)
    from PIL import ImageDraw

    draw = ImageDraw.Draw(canvas)
    scaled = [(float(px) * 4, float(py) * 4) for px, py in points]
    draw.line(scaled, fill=255, width=max(1, round(width * 4)), joint="curve")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _random_centre(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    """A point at least ``radius`` pixels inside the defect-safe area."""
    low = _SAFE_MARGIN * size + radius
    high = (1.0 - _SAFE_MARGIN) * size - radius
    return rng.uniform(low, max(low + 1.0, high), size=2)


def _scratch(rng: np.random.Generator, size: int) -> np.ndarray:
    """Soft mask of a straight scratch."""
    length = rng.uniform(0.18, 0.35) * size
    centre = _random_centre(rng, size, length / 2)
    angle = rng.uniform(0.0, np.pi)
    offset = 0.5 * length * np.array([np.cos(angle), np.sin(angle)])
    return _line_mask(size, np.stack([centre - offset, centre + offset]), rng.uniform(1.6, 2.6))


def _spot(rng: np.random.Generator, size: int) -> np.ndarray:
    """Soft mask of an elliptical blob."""
    radius = rng.uniform(0.025, 0.05) * size
    cx, cy = _random_centre(rng, size, radius * 1.6)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    ratio = rng.uniform(0.6, 1.0)
    angle = rng.uniform(0.0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    distance = np.sqrt((u / radius) ** 2 + (v / (radius * ratio)) ** 2)
    return np.clip(1.6 - distance, 0.0, 1.0) ** 0.7


def _crack(rng: np.random.Generator, size: int) -> np.ndarray:
    """Soft mask of a random-walk polyline."""
    steps = int(rng.integers(14, 24))
    step = rng.uniform(0.012, 0.018) * size
    reach = steps * step * 0.6
    point = _random_centre(rng, size, reach / 2)
    heading = rng.uniform(0.0, 2 * np.pi)
    points = [point.copy()]
    low, high = _SAFE_MARGIN * size, (1.0 - _SAFE_MARGIN) * size
    for _ in range(steps):
        heading += rng.normal(0.0, 0.5)
        point = np.clip(point + step * np.array([np.cos(heading), np.sin(heading)]), low, high)
        points.append(point.copy())
    return _line_mask(size, np.stack(points), rng.uniform(1.5, 2.2))


_DEFECT_SHAPES = {"scratch": _scratch, "spot": _spot, "crack": _crack}


def make_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Add one defect of a kind to a surface image.

    Args:
        image: RGB float image in ``[0, 1]``, shape ``(H, W, 3)`` with ``H == W``.
        kind: ``"scratch"``, ``"spot"`` or ``"crack"``.
        rng: Random generator.

    Returns:
        ``(defective image, mask)``: the image with the defect (float32, same shape) and the
        ground-truth mask, shape ``(H, W)``, ``uint8`` with 255 on defect pixels.

    Raises:
        ValueError: For an unknown kind or a non-square image.
    """
    if kind not in _DEFECT_SHAPES:
        raise ValueError(f"unknown defect kind {kind!r}; choose one of {list(_DEFECT_SHAPES)}")
    if image.ndim != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must have shape (S, S, 3), got {image.shape}")
    size = image.shape[0]
    soft = _DEFECT_SHAPES[kind](rng, size)
    dark = kind == "crack" or rng.random() < 0.6
    strength = rng.uniform(0.22, 0.32) * (-1.0 if dark else 1.0)
    tint = np.array([1.0, 1.0, 1.0], dtype=np.float32)
    if kind == "spot":  # a rust-like stain: warmer than the surface whether darker or brighter
        tint = np.array([0.6, 0.85, 1.0] if dark else [1.0, 0.85, 0.6], dtype=np.float32)
    defective = image + strength * soft[:, :, None] * tint[None, None, :]
    mask = np.where(soft > 0.25, 255, 0).astype(np.uint8)
    return np.clip(defective, 0.0, 1.0).astype(np.float32), mask


def _to_png(image: np.ndarray, path: Path) -> None:
    """Write a float RGB image in ``[0, 1]`` (or a uint8 mask) as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.dtype != np.uint8:
        image = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    Image.fromarray(image).save(path, format="PNG")


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (copy where links are not possible)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _night_kinds(n_night: int, defect_share: float) -> list[str]:
    """Kinds of the night's images: good ones first, then the defect kinds in turn."""
    n_defective = round(n_night * defect_share)
    kinds = [NORMAL_KIND] * (n_night - n_defective)
    kinds += [DEFECT_KINDS[i % len(DEFECT_KINDS)] for i in range(n_defective)]
    return kinds


def _check_counts(n_train: int, n_night: int, size: int, defect_share: float) -> None:
    """Reject sizes the demo cannot work with."""
    if n_train < 2:
        raise ValueError(f"n_train must be at least 2, got {n_train}")
    if n_night < 2:
        raise ValueError(f"n_night must be at least 2, got {n_night}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    if not 0.0 < defect_share < 1.0:
        raise ValueError(f"defect_share must be between 0 and 1, got {defect_share}")


def make_demo_dataset(
    root: str | Path,
    n_train: int = 60,
    n_night: int = 24,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    defect_share: float = 0.625,
) -> DemoDataset:
    """Write the synthetic product data set to a folder (deterministic for a given seed).

    Args:
        root: Output folder (created; files of an earlier call with the same arguments are
            overwritten with identical ones).
        n_train: Normal training images.
        n_night: Images of the night (normal and defective).
        seed: Random seed; the same seed gives byte-identical images.
        size: Side of the square images in pixels.
        defect_share: Share of defective images in the night (split evenly over the kinds).

    Returns:
        Where everything was written and the kind of every night image.

    Raises:
        ValueError: For counts or sizes the data set cannot be made with.
    """
    _check_counts(n_train, n_night, size, defect_share)
    base = Path(root)
    dataset = DemoDataset(
        root=base,
        train_dir=base / "train" / NORMAL_KIND,
        night_dir=base / "night",
        night_masks_dir=base / "night_masks",
    )
    for index in range(n_train):
        rng = np.random.default_rng([seed, 0, index])
        _to_png(make_surface(rng, size), dataset.train_dir / f"{index:03d}.png")
    counters: dict[str, int] = {}
    for index, kind in enumerate(_night_kinds(n_night, defect_share)):
        number = counters.get(kind, 0)
        counters[kind] = number + 1
        rng = np.random.default_rng([seed, 1, index])
        image = make_surface(rng, size)
        test_path = base / "test" / kind / f"{number:03d}.png"
        night_name = f"{kind}_{number:03d}.png"
        if kind != NORMAL_KIND:
            image, mask = make_defect(image, kind, rng)
            mask_path = base / "ground_truth" / kind / f"{number:03d}_mask.png"
            _to_png(mask, mask_path)
            _link_or_copy(mask_path, dataset.night_masks_dir / f"{kind}_{number:03d}_mask.png")
        _to_png(image, test_path)
        _link_or_copy(test_path, dataset.night_dir / night_name)
        dataset.labels[night_name] = kind
    return dataset
