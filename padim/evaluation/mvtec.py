"""The MVTec AD folder layout: categories' train/test images, defect kinds and ground-truth masks.

Layout (local folder or any fsspec URL)::

    DATASET/train/good/*                               normal images (fit on these)
    DATASET/test/good/*                                normal test images (no mask: all normal)
    DATASET/test/<kind>/*                              defective test images
    DATASET/ground_truth/<kind>/<stem>_mask.png        their masks (> 0 = defect)

:func:`discover_layout` lists a data set's images and masks; :func:`load_mask` reads a mask at the
model's input resolution: every mask goes through the same resize and centre crop as its image
(nearest neighbour, :func:`apply_geometry`), see :func:`padim.core.preprocessing.compute_geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from padim.core.config import PadimConfig
from padim.core.preprocessing import compute_geometry
from padim.errors import PadimError
from padim.io.fsio import join_url, to_url, url_to_fs
from padim.io.listing import list_images

__all__ = [
    "NORMAL_KIND",
    "DatasetLayout",
    "DatasetLayoutError",
    "TestImage",
    "apply_geometry",
    "discover_layout",
    "image_stem",
    "load_mask",
]

NORMAL_KIND = "good"


class DatasetLayoutError(PadimError, ValueError):
    """The data set does not follow the MVTec layout (missing folder, mask or image)."""


@dataclass(frozen=True)
class TestImage:
    """One test image of an MVTec-layout data set.

    Attributes:
        uri: Image URI.
        kind: ``"good"`` or the defect kind (the name of its ``test/`` subfolder).
        mask_uri: URI of its ground-truth mask; ``None`` for good images (all normal).
    """

    uri: str
    kind: str
    mask_uri: str | None

    @property
    def anomalous(self) -> bool:
        """True for defective images."""
        return self.kind != NORMAL_KIND


@dataclass(frozen=True)
class DatasetLayout:
    """The images of an MVTec-layout data set.

    Attributes:
        root: The data set URL.
        train: Normal training images (sorted URIs).
        test: Test images, sorted by kind then URI.
    """

    root: str
    train: list[str]
    test: list[TestImage]

    @property
    def kinds(self) -> list[str]:
        """Defect kinds present in the test set, sorted."""
        return sorted({image.kind for image in self.test} - {NORMAL_KIND})


def _subfolders(url: str) -> list[str]:
    """Names of the direct subfolders of a folder URL, sorted."""
    fs, path = url_to_fs(url)
    entries = fs.ls(path, detail=True)
    names = [str(entry["name"]).rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "directory"]
    return sorted(name for name in names if not name.startswith("."))


def image_stem(uri: str) -> str:
    """File name without folder and extension.

    Args:
        uri: Image or mask URI.

    Returns:
        ``"000"`` for ``".../test/broken/000.png"``.
    """
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def discover_layout(dataset_dir: str | Path) -> DatasetLayout:
    """List the images and masks of an MVTec-layout data set.

    Args:
        dataset_dir: Folder (local path or fsspec URL) holding ``train/``, ``test/`` and
            ``ground_truth/``.

    Returns:
        The layout.

    Raises:
        DatasetLayoutError: If a folder is missing or empty, or a defective image has no mask.
    """
    root = str(dataset_dir)
    fs, root_path = url_to_fs(root)
    root = to_url(fs, root_path)
    for required in ("train/good", "test"):
        if not fs.isdir(url_to_fs(join_url(root, required))[1]):
            raise DatasetLayoutError(f"{root} is not an MVTec-layout data set: folder '{required}' is missing")
    train = list_images(join_url(root, "train", NORMAL_KIND))
    if len(train) < 2:
        folder = join_url(root, "train", NORMAL_KIND)
        raise DatasetLayoutError(f"{folder} holds {len(train)} images; at least 2 are needed")
    test: list[TestImage] = []
    for kind in _subfolders(join_url(root, "test")):
        for uri in list_images(join_url(root, "test", kind)):
            mask_uri = (
                None if kind == NORMAL_KIND else join_url(root, "ground_truth", kind, f"{image_stem(uri)}_mask.png")
            )
            if mask_uri is not None and not fs.exists(url_to_fs(mask_uri)[1]):
                raise DatasetLayoutError(f"defective test image {uri} has no mask (expected {mask_uri})")
            test.append(TestImage(uri=uri, kind=kind, mask_uri=mask_uri))
    if not test:
        raise DatasetLayoutError(f"{join_url(root, 'test')} holds no test images")
    return DatasetLayout(root=root, train=train, test=test)


def apply_geometry(image: Image.Image, config: PadimConfig, resample: Image.Resampling) -> Image.Image:
    """Resize and crop an image (or mask) exactly as the model's preprocessing does.

    Args:
        image: Image or mask at its original size.
        config: Preprocessing options.
        resample: ``BILINEAR`` for images (as :class:`padim.core.preprocessing.Preprocessor`),
            ``NEAREST`` for masks.

    Returns:
        The ``(S, S)`` view the model sees.
    """
    geometry = compute_geometry(image.width, image.height, config)
    if image.size != geometry.resized:
        image = image.resize(geometry.resized, resample, reducing_gap=None)
    if geometry.crop_box != (0, 0, *geometry.resized):
        image = image.crop(geometry.crop_box)
    return image


def load_mask(mask_uri: str | None, size: tuple[int, int], config: PadimConfig) -> np.ndarray:
    """Load a ground-truth mask at the model's input resolution.

    Args:
        mask_uri: Mask URI, or ``None`` for an all-normal mask.
        size: ``(width, height)`` of the image the mask belongs to.
        config: Preprocessing options.

    Returns:
        Boolean mask of shape ``(S, S)``: ``True`` where the resized, cropped mask is ``> 0``.

    Raises:
        DatasetLayoutError: If the mask cannot be read or its size differs from the image's.
    """
    side = config.input_size
    if mask_uri is None:
        return np.zeros((side, side), dtype=bool)
    fs, path = url_to_fs(mask_uri)
    try:
        with fs.open(path, "rb") as handle, Image.open(handle) as opened:
            opened.load()
            mask = opened.copy()
    except (OSError, ValueError) as exc:
        raise DatasetLayoutError(f"cannot read mask {mask_uri}: {exc}") from exc
    if mask.size != tuple(size):
        raise DatasetLayoutError(
            f"mask {mask_uri} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}"
        )
    binary = np.asarray(mask) > 0
    if binary.ndim == 3:  # an RGB(A) mask: defect where any channel is non-zero
        binary = binary.any(axis=-1)
    resized = apply_geometry(Image.fromarray(binary.astype(np.uint8) * 255, mode="L"), config, Image.Resampling.NEAREST)
    return np.asarray(resized) > 0
