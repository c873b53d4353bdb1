"""Turning decoded images into normalised backbone input tensors.

The paper's protocol (the default) resizes every image to 256 x 256 and centre-crops 224 x 224.
Both sizes are configurable, the crop can be switched off, and ``resize_mode="shorter_side"``
keeps the aspect ratio (the shorter side becomes ``image_size``; the crop then makes the tensor
square).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from padim.core.config import PadimConfig


@dataclass(frozen=True)
class Geometry:
    """How an original image maps onto the model's input square.

    Attributes:
        resized: ``(width, height)`` after resizing.
        crop_box: ``(left, top, right, bottom)`` of the crop inside the resized image.
    """

    resized: tuple[int, int]
    crop_box: tuple[int, int, int, int]


def compute_geometry(width: int, height: int, config: PadimConfig) -> Geometry:
    """Compute the resize and crop applied to an image of a given size.

    Args:
        width: Original width in pixels.
        height: Original height in pixels.
        config: Preprocessing options.

    Returns:
        The resized size and the crop box.
    """
    if config.resize_mode == "square":
        resized = (config.image_size, config.image_size)
    else:
        scale = config.image_size / min(width, height)
        resized = (max(config.image_size, round(width * scale)), max(config.image_size, round(height * scale)))
    side = config.input_size
    left = round((resized[0] - side) / 2.0)
    top = round((resized[1] - side) / 2.0)
    if config.crop_size is None:
        return Geometry(resized=resized, crop_box=(0, 0, resized[0], resized[1]))
    return Geometry(resized=resized, crop_box=(left, top, left + side, top + side))


class Preprocessor:
    """Callable mapping an RGB PIL image to a normalised ``(3, S, S)`` float tensor.

    With ``normalize=False`` it returns the resized, cropped pixels as a ``uint8`` tensor instead;
    :class:`padim.core.features.FeatureExtractor` then normalises on the compute device. That is the
    fast path of the pipeline: a quarter of the bytes to pin and copy to a GPU, and the float
    arithmetic moves off the decoding threads.

    Args:
        config: Resize/crop options.
        mean: Per-channel mean of the backbone's normalisation.
        std: Per-channel standard deviation of the backbone's normalisation.
        normalize: Return normalised float32 (default) or raw ``uint8`` pixels.
    """

    def __init__(
        self, config: PadimConfig, mean: tuple[float, ...], std: tuple[float, ...], normalize: bool = True
    ) -> None:
        self.config = config
        self.normalize = normalize
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.inv_std = (1.0 / np.asarray(std, dtype=np.float32)).reshape(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Resize, crop and normalise one image.

        Args:
            image: Decoded image; converted to RGB if it is not (an 8-bit grayscale ``L`` image
                after resizing and cropping: the same pixels, a third of the work).

        Returns:
            Tensor of shape ``(3, S, S)``, ``S = config.input_size``: float32 normalised, or
            ``uint8`` pixels when ``normalize`` is off.
        """
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        geometry = compute_geometry(image.width, image.height, self.config)
        if image.size != geometry.resized:
            image = image.resize(geometry.resized, Image.Resampling.BILINEAR, reducing_gap=None)
        if geometry.crop_box != (0, 0, *geometry.resized):
            image = image.crop(geometry.crop_box)
        if image.mode == "L":
            image = image.convert("RGB")
        if not self.normalize:
            return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * (1.0 / 255.0)
        array = (array - self.mean) * self.inv_std
        return torch.from_numpy(np.ascontiguousarray(array))


def map_to_original(anomaly_map: torch.Tensor, width: int, height: int, config: PadimConfig) -> torch.Tensor:
    """Place an anomaly map computed on the model input back onto the original image grid.

    The map is resized from the crop back to the crop's footprint in the original image (bilinear);
    pixels outside the crop (cut away by the centre crop) get the map's minimum value.

    Args:
        anomaly_map: Map over the model input, shape ``(S, S)``.
        width: Original image width.
        height: Original image height.
        config: The preprocessing options the map was computed with.

    Returns:
        Map of shape ``(height, width)``.
    """
    geometry = compute_geometry(width, height, config)
    sx = width / geometry.resized[0]
    sy = height / geometry.resized[1]
    left, top, right, bottom = geometry.crop_box
    x0, x1 = round(left * sx), round(right * sx)
    y0, y1 = round(top * sy), round(bottom * sy)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
    inner = torch.nn.functional.interpolate(
        anomaly_map[None, None].float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False
    )[0, 0]
    full = torch.full((height, width), float(anomaly_map.min()), dtype=inner.dtype)
    full[y0 : min(y1, height), x0 : min(x1, width)] = inner[: min(y1, height) - y0, : min(x1, width) - x0]
    return full


def input_to_original_xy(x: float, y: float, width: int, height: int, config: PadimConfig) -> tuple[int, int]:
    """Map a pixel of the model input back to the original image.

    Args:
        x: Column in the model input (``0 .. S-1``).
        y: Row in the model input.
        width: Original width.
        height: Original height.
        config: The preprocessing options.

    Returns:
        ``(x, y)`` in original pixel coordinates, clipped to the image.
    """
    geometry = compute_geometry(width, height, config)
    left, top = geometry.crop_box[0], geometry.crop_box[1]
    ox = (x + 0.5 + left) * width / geometry.resized[0] - 0.5
    oy = (y + 0.5 + top) * height / geometry.resized[1] - 0.5
    return min(max(round(ox), 0), width - 1), min(max(round(oy), 0), height - 1)
