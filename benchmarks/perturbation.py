"""Perturbed copies of an MVTec-layout data set: parts that are not aligned (issue 18).

PaDiM fits one Gaussian per patch position, so it assumes that every image shows the part at the
same place and angle. This module writes a reproducible copy of a data set in which every train
and test image is randomly shifted, rotated and changed in brightness and contrast, and every
ground-truth mask gets *exactly* the geometric transform of its image (nearest-neighbour, so it
stays binary; no photometric change). The copy has the same layout as the source
(``train/good``, ``test/<kind>``, ``ground_truth/<kind>/<stem>_mask.png``), so every loader of
the project reads it; all images are written as PNG.

Perturbations (:data:`PERTURBATIONS`):

* ``shifted``: shift up to 10 % of each side, rotation up to 15 degrees either way, brightness
  and contrast factors in [0.8, 1.2];
* ``any_angle``: the same with a rotation by any angle in [0, 360) (round parts).

The border is filled by reflection (``torch.nn.functional.grid_sample`` with
``padding_mode="reflection"``) for images *and* masks: a defect that the reflection copies into
the border is visible in the image, so its mask marks it too (``mask_padding="zeros"`` fills
masks with 0 instead).

Every file draws its transform from its own generator, seeded from ``(seed, relative path)``:
the result does not depend on the order in which files are processed, and the same seed gives
byte-identical files. The draws are recorded in ``manifest.json`` at the root of the copy.

The copy is written to a temporary folder and renamed into place under
``$PADIM_CACHE/perturbed/<dataset>-<perturbation>-seed<seed>`` (default ``~/.cache/padim``),
and reused when present.

Usage::

    python benchmarks/perturbation.py --dataset mvtec_bottle --perturbation any_angle --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS_DIR = REPO.parent / "shared" / "datasets"
GENERATOR_VERSION = 1
PNG_COMPRESS_LEVEL = 1
"""zlib level of the PNG copies: 5x faster to write than PIL's default 6, files about 1.5x larger."""
"""Bumped whenever the output of a given seed changes; a cached copy of another version is rebuilt."""
MANIFEST = "manifest.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIX = "_mask.png"
Padding = Literal["reflection", "zeros"]


@dataclass(frozen=True)
class Perturbation:
    """Bounds of the random transform drawn for each image.

    Attributes:
        name: Name of the perturbation (part of the cache folder's name).
        max_shift: Largest shift along each axis, as a fraction of that side.
        max_angle: Largest rotation either way, degrees (ignored when ``any_angle``).
        any_angle: Rotate by an angle drawn uniformly from [0, 360).
        max_photometric: Largest relative change of brightness and of contrast (0.2: factors in
            [0.8, 1.2]).
    """

    name: str
    max_shift: float = 0.10
    max_angle: float = 15.0
    any_angle: bool = False
    max_photometric: float = 0.20

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_shift < 0.5:
            raise ValueError(f"max_shift must be in [0, 0.5), got {self.max_shift}")
        if not 0.0 <= self.max_angle <= 180.0:
            raise ValueError(f"max_angle must be in [0, 180] degrees, got {self.max_angle}")
        if not 0.0 <= self.max_photometric < 1.0:
            raise ValueError(f"max_photometric must be in [0, 1), got {self.max_photometric}")


PERTURBATIONS: dict[str, Perturbation] = {
    "shifted": Perturbation("shifted"),
    "any_angle": Perturbation("any_angle", any_angle=True),
}
"""The perturbations of the robustness benchmark, by name."""


@dataclass(frozen=True)
class Draw:
    """The transform drawn for one image (and its mask).

    The image is rotated by ``angle`` degrees about its centre (counter-clockwise as displayed),
    then shifted by ``(dx, dy)`` pixels (``+x`` right, ``+y`` down); then its brightness is scaled
    by ``brightness`` and its contrast (around its mean luminance) by ``contrast``.
    """

    dx: float
    dy: float
    angle: float
    brightness: float
    contrast: float


# --------------------------------------------------------------------------------------------
# Drawing and applying one transform
# --------------------------------------------------------------------------------------------


def file_seed(seed: int, relative_path: str) -> list[int]:
    """Entropy of a file's own generator: the seed and a stable hash of its relative path.

    Args:
        seed: Seed of the whole perturbed copy (>= 0).
        relative_path: POSIX path of the image relative to the data set's root.

    Returns:
        Words for :class:`numpy.random.SeedSequence`.

    Raises:
        ValueError: If ``seed`` is negative.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return [seed, *(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))]


def draw_transform(perturbation: Perturbation, seed: int, relative_path: str, size: tuple[int, int]) -> Draw:
    """Draw the transform of one image from its own generator.

    Args:
        perturbation: Bounds of the transform.
        seed: Seed of the perturbed copy.
        relative_path: Relative POSIX path of the image in the *source* data set.
        size: ``(width, height)`` of the image.

    Returns:
        The drawn transform.
    """
    rng = np.random.default_rng(file_seed(seed, relative_path))
    width, height = size
    dx, dy = (rng.uniform(-1.0, 1.0, size=2) * perturbation.max_shift * np.array([width, height])).tolist()
    if perturbation.any_angle:
        angle = float(rng.uniform(0.0, 360.0))
    else:
        angle = float(rng.uniform(-perturbation.max_angle, perturbation.max_angle))
    brightness, contrast = (1.0 + rng.uniform(-1.0, 1.0, size=2) * perturbation.max_photometric).tolist()
    return Draw(dx=dx, dy=dy, angle=angle, brightness=brightness, contrast=contrast)


def _rotation(angle: float) -> np.ndarray:
    """Rotation matrix of ``angle`` degrees, counter-clockwise as displayed (y axis down)."""
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    return np.array([[cos, sin], [-sin, cos]])


def map_points(points: np.ndarray, draw: Draw, size: tuple[int, int]) -> np.ndarray:
    """Where points of the source image land in the perturbed image.

    Args:
        points: ``(N, 2)`` continuous ``(x, y)`` coordinates (pixel ``i`` spans ``[i, i + 1)``).
        draw: The transform.
        size: ``(width, height)`` of the image.

    Returns:
        ``(N, 2)`` coordinates in the perturbed image.
    """
    centre = np.array(size, dtype=np.float64) / 2.0
    shifted = (np.asarray(points, dtype=np.float64) - centre) @ _rotation(draw.angle).T
    return shifted + centre + np.array([draw.dx, draw.dy])


def sampling_grid(draw: Draw, size: tuple[int, int]) -> torch.Tensor:
    """The ``grid_sample`` grid of a transform: for each output pixel, where to read the source.

    The inverse of ``p_out = R (p_in - c) + c + t`` is ``p_in = R^T (p_out - c - t) + c``; in the
    normalised coordinates of ``grid_sample`` (``p = S (n + 1)``, ``S = diag(W, H) / 2``, which is
    also ``c``) it is the affine map ``n_in = S^-1 R^T S n_out - S^-1 R^T t``.

    Args:
        draw: The transform.
        size: ``(width, height)`` of the image (the output has the same size).

    Returns:
        ``(1, H, W, 2)`` float32 normalised source coordinates (``align_corners=False``).
    """
    width, height = size
    scale = np.diag([width / 2.0, height / 2.0])
    inverse = _rotation(draw.angle).T
    linear = np.linalg.inv(scale) @ inverse @ scale
    offset = -np.linalg.inv(scale) @ inverse @ np.array([draw.dx, draw.dy])
    theta = torch.from_numpy(np.concatenate([linear, offset[:, None]], axis=1).astype(np.float32))[None]
    return torch.nn.functional.affine_grid(theta, [1, 1, height, width], align_corners=False)


def warp(array: np.ndarray, grid: torch.Tensor, mode: Literal["bilinear", "nearest"], padding: Padding) -> np.ndarray:
    """Resample an ``(H, W, C)`` float array through a sampling grid.

    Args:
        array: ``(H, W, C)`` float32 image.
        grid: ``(1, H, W, 2)`` grid from :func:`sampling_grid`.
        mode: ``"bilinear"`` for images, ``"nearest"`` for masks.
        padding: ``"reflection"`` or ``"zeros"`` outside the source.

    Returns:
        ``(H, W, C)`` float32 resampled array.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]
    warped = torch.nn.functional.grid_sample(tensor, grid, mode=mode, padding_mode=padding, align_corners=False)
    return warped[0].numpy().transpose(1, 2, 0)


def adjust_photometric(array: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """Scale brightness, then contrast around the mean luminance (torchvision's definitions).

    Computed in float64 with a sequential mean, so the result does not depend on threading.

    Args:
        array: ``(H, W, C)`` image in [0, 1], ``C`` 1 or 3.
        brightness: Brightness factor (1: unchanged).
        contrast: Contrast factor (1: unchanged).

    Returns:
        ``(H, W, C)`` float64 image in [0, 1].
    """
    values = np.clip(array.astype(np.float64) * brightness, 0.0, 1.0)
    luminance = values[..., 0] if values.shape[-1] == 1 else values @ np.array([0.299, 0.587, 0.114])
    mean = float(np.sum(luminance, dtype=np.float64)) / luminance.size
    return np.clip((values - mean) * contrast + mean, 0.0, 1.0)


def perturb_image(image: Image.Image, draw: Draw) -> Image.Image:
    """Apply a transform to an image: warp with reflection at the border, then photometry.

    Args:
        image: Grayscale (``L``) or colour image; other modes are converted to ``RGB``.
        draw: The transform.

    Returns:
        The perturbed image, same size, mode ``L`` or ``RGB``.
    """
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    warped = warp(array, sampling_grid(draw, image.size), "bilinear", "reflection")
    adjusted = adjust_photometric(warped, draw.brightness, draw.contrast)
    pixels = np.rint(adjusted * 255.0).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if image.mode == "L" else pixels, mode=image.mode)


def perturb_mask(mask: Image.Image, draw: Draw, padding: Padding = "reflection") -> Image.Image:
    """Apply the geometric part of a transform to a mask (nearest neighbour, no photometry).

    Args:
        mask: Ground-truth mask (defect where any channel is > 0).
        draw: The transform of the mask's image.
        padding: Fill outside the source: ``"reflection"`` (as the image) or ``"zeros"``.

    Returns:
        Binary mode-``L`` mask (0 or 255), same size.
    """
    binary = np.asarray(mask) > 0
    if binary.ndim == 3:
        binary = binary.any(axis=-1)
    warped = warp(binary.astype(np.float32)[..., None], sampling_grid(draw, mask.size), "nearest", padding)
    return Image.fromarray(np.where(warped[..., 0] > 0.5, 255, 0).astype(np.uint8), mode="L")


# --------------------------------------------------------------------------------------------
# A whole data set
# --------------------------------------------------------------------------------------------


def _images_under(folder: Path) -> list[Path]:
    """Image files directly in a folder, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_source_images(dataset_dir: Path) -> list[tuple[str, str | None]]:
    """The images of an MVTec-layout data set and their masks, as relative POSIX paths.

    Args:
        dataset_dir: Folder with ``train/good``, ``test/<kind>`` and ``ground_truth/<kind>``.

    Returns:
        ``(image, mask or None)`` pairs: every ``train/*/*`` and ``test/*/*`` image, with its
        ``ground_truth/<kind>/<stem>_mask.png`` when present.

    Raises:
        ValueError: If ``train`` or ``test`` is missing, two images of a folder share a stem, or a
            mask has no image.
    """
    pairs: list[tuple[str, str | None]] = []
    for split in ("train", "test"):
        if not (dataset_dir / split).is_dir():
            raise ValueError(f"{dataset_dir} is not an MVTec-layout data set: folder '{split}' is missing")
        for kind_dir in sorted(p for p in (dataset_dir / split).iterdir() if p.is_dir()):
            stems: set[str] = set()
            for image in _images_under(kind_dir):
                if image.stem in stems:
                    raise ValueError(f"two images named {image.stem}.* in {kind_dir}: the PNG copies would collide")
                stems.add(image.stem)
                mask = dataset_dir / "ground_truth" / kind_dir.name / f"{image.stem}{MASK_SUFFIX}"
                has_mask = split == "test" and mask.is_file()
                pairs.append(
                    (
                        image.relative_to(dataset_dir).as_posix(),
                        mask.relative_to(dataset_dir).as_posix() if has_mask else None,
                    )
                )
    known = {mask for _, mask in pairs if mask}
    for mask in sorted((dataset_dir / "ground_truth").glob(f"*/*{MASK_SUFFIX}")):
        if mask.relative_to(dataset_dir).as_posix() not in known:
            raise ValueError(f"mask {mask} has no image in test/{mask.parent.name}")
    return pairs


def _png_path(relative: str) -> str:
    """The relative path of a file's PNG copy."""
    return str(Path(relative).with_suffix(".png").as_posix())


def _open(path: Path) -> Image.Image:
    """Read an image fully and close the file."""
    with Image.open(path) as opened:
        opened.load()
        return opened.copy()


def perturb_file(
    dataset_dir: Path,
    out_dir: Path,
    pair: tuple[str, str | None],
    perturbation: Perturbation,
    seed: int,
    mask_padding: Padding,
) -> dict[str, Any]:
    """Write the perturbed copy of one image (and its mask) and return its manifest entry.

    Raises:
        ValueError: If the mask's size differs from the image's.
    """
    relative, mask_relative = pair
    image = _open(dataset_dir / relative)
    draw = draw_transform(perturbation, seed, relative, image.size)
    target = out_dir / _png_path(relative)
    target.parent.mkdir(parents=True, exist_ok=True)
    perturb_image(image, draw).save(target, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    entry: dict[str, Any] = {"source": relative, "width": image.width, "height": image.height, **asdict(draw)}
    if mask_relative is not None:
        mask = _open(dataset_dir / mask_relative)
        if mask.size != image.size:
            raise ValueError(f"mask {mask_relative} is {mask.size} but its image {relative} is {image.size}")
        mask_target = out_dir / mask_relative
        mask_target.parent.mkdir(parents=True, exist_ok=True)
        perturb_mask(mask, draw, mask_padding).save(mask_target, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        entry["mask"] = mask_relative
    return entry


def _copy_extras(dataset_dir: Path, out_dir: Path) -> None:
    """Copy the top-level files (licence, readme) verbatim."""
    for extra in sorted(p for p in dataset_dir.iterdir() if p.is_file()):
        shutil.copyfile(extra, out_dir / extra.name)


def write_perturbed(
    dataset_dir: Path, out_dir: Path, perturbation: Perturbation, seed: int, mask_padding: Padding = "reflection"
) -> dict[str, Any]:
    """Write a perturbed copy of a data set into ``out_dir`` (not atomic; see :func:`ensure_perturbed`).

    Args:
        dataset_dir: Source data set (MVTec layout).
        out_dir: Empty or missing folder to write to.
        perturbation: Bounds of the transforms.
        seed: Seed of the copy.
        mask_padding: Fill of the masks outside the source (``"reflection"`` or ``"zeros"``).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ValueError: If ``mask_padding`` is unknown or the source is not an MVTec-layout data set.
    """
    if mask_padding not in ("reflection", "zeros"):
        raise ValueError(f"mask_padding must be 'reflection' or 'zeros', got {mask_padding!r}")
    pairs = list_source_images(dataset_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        _png_path(pair[0]): perturb_file(dataset_dir, out_dir, pair, perturbation, seed, mask_padding) for pair in pairs
    }
    _copy_extras(dataset_dir, out_dir)
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "dataset": dataset_dir.name,
        "source": str(dataset_dir),
        "seed": seed,
        "perturbation": asdict(perturbation),
        "image_padding": "reflection",
        "mask_padding": mask_padding,
        "files": files,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def cache_root() -> Path:
    """Where perturbed copies are kept (``$PADIM_CACHE/perturbed``, default ``~/.cache/padim``)."""
    return Path(os.environ.get("PADIM_CACHE", Path.home() / ".cache" / "padim")) / "perturbed"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a perturbed copy, or ``None`` when the folder holds no readable one."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def get_perturbation(name: str) -> Perturbation:
    """The perturbation of that name.

    Raises:
        ValueError: If there is none.
    """
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {list(PERTURBATIONS)}")
    return PERTURBATIONS[name]


def ensure_perturbed(
    dataset_dir: Path,
    perturbation: str | Perturbation,
    seed: int = 0,
    cache_dir: Path | None = None,
    mask_padding: Padding = "reflection",
) -> Path:
    """The perturbed copy of a data set, written atomically on first use and reused after.

    The copy is built in a temporary folder beside its final place and renamed into place, so a
    reader never sees a partial copy and concurrent builders do not clash (the first rename wins).

    Args:
        dataset_dir: Source data set (MVTec layout).
        perturbation: Name in :data:`PERTURBATIONS` or a :class:`Perturbation`.
        seed: Seed of the copy.
        cache_dir: Parent folder (default :func:`cache_root`).
        mask_padding: Fill of the masks outside the source; a non-default value is part of the
            folder's name.

    Returns:
        ``<cache_dir>/<dataset>-<perturbation>-seed<seed>``.

    Raises:
        ValueError: If the perturbation is unknown or the source is not a data set.
    """
    spec = get_perturbation(perturbation) if isinstance(perturbation, str) else perturbation
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise ValueError(f"data set {dataset_dir} not found")
    parent = Path(cache_dir) if cache_dir is not None else cache_root()
    suffix = "" if mask_padding == "reflection" else f"-mask{mask_padding}"
    final = parent / f"{dataset_dir.name}-{spec.name}-seed{seed}{suffix}"
    manifest = read_manifest(final)
    if manifest is not None and manifest.get("generator_version") == GENERATOR_VERSION:
        return final
    parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    try:
        write_perturbed(dataset_dir, building, spec, seed, mask_padding)
        current = read_manifest(final)
        if current is not None and current.get("generator_version") == GENERATOR_VERSION:
            return final  # another process finished first
        if final.exists():  # a copy of another generator version (or a broken one): move it aside
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".stale", dir=parent))
            os.replace(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(building, final)
    except OSError:
        if read_manifest(final) is None:  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final


def main(argv: Iterable[str] | None = None) -> int:
    """Command-line entry point: build (or find) a perturbed copy and print its folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets-dir", type=Path, default=DEFAULT_DATASETS_DIR)
    parser.add_argument("--dataset", required=True, help="folder name under --datasets-dir, e.g. mvtec_bottle")
    parser.add_argument("--perturbation", choices=list(PERTURBATIONS), required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="default: $PADIM_CACHE/perturbed")
    args = parser.parse_args(list(argv) if argv is not None else None)
    print(ensure_perturbed(args.datasets_dir / args.dataset, args.perturbation, args.seed, args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
