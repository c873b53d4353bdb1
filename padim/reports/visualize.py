"""Heat-map overlays and evaluation panels as PIL images (no matplotlib figure state).

:func:`overlay_heatmap` is shared by the evaluation figures and the nightly score flow: a colour
map of the anomaly map blended onto the image, plus the outline of the region above the pixel
threshold. It uses matplotlib only for the colour look-up table, so it is fast (a few ms per
image), thread-safe and independent of any backend.
"""

from __future__ import annotations

from functools import lru_cache

import matplotlib
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = ["mask_image", "overlay_heatmap", "render_panel"]

_OUTLINE_COLOUR = (255, 255, 255)
_LABEL_HEIGHT = 16


@lru_cache(maxsize=8)
def _colour_table(cmap: str) -> np.ndarray:
    """RGB look-up table of a matplotlib colour map, shape ``(256, 3)``, uint8."""
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as exc:
        raise ValueError(f"unknown colour map '{cmap}'") from exc
    table = colormap(np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]
    table.setflags(write=False)
    return table


def _fit_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float map to ``size = (width, height)`` bilinearly, if needed."""
    if anomaly_map.shape == (size[1], size[0]):
        return anomaly_map
    resized = Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _outline(region: np.ndarray) -> np.ndarray:
    """Boundary pixels of a binary region (the region minus its erosion), two pixels wide."""
    if not region.any():
        return region
    return region & ~ndimage.binary_erosion(region, iterations=2, border_value=0)


def overlay_heatmap(
    image: Image.Image,
    anomaly_map: np.ndarray,
    threshold: float | None,
    vmin: float,
    vmax: float,
    alpha: float = 0.45,
    cmap: str = "jet",
) -> Image.Image:
    """Blend a colour-mapped anomaly map onto an image and outline the anomalous region.

    Args:
        image: The image the map belongs to (any mode; converted to RGB).
        anomaly_map: Anomaly map, shape ``(H, W)``; resized bilinearly to the image when its
            shape differs from ``(image.height, image.width)``.
        threshold: Pixel threshold; pixels with a value strictly above it are outlined. ``None``
            draws no outline.
        vmin: Value mapped to the bottom of the colour map.
        vmax: Value mapped to the top of the colour map (must exceed ``vmin``).
        alpha: Weight of the heat map in the blend, in ``[0, 1]``.
        cmap: matplotlib colour-map name.

    Returns:
        A new RGB image of the input's size.

    Raises:
        ValueError: If the map is not 2-D, ``vmax <= vmin`` or ``alpha`` is outside ``[0, 1]``.
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"anomaly_map must have shape (H, W), got {values.shape}")
    if not vmax > vmin:
        raise ValueError(f"vmax ({vmax}) must be greater than vmin ({vmin})")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    base = image.convert("RGB") if image.mode != "RGB" else image
    values = _fit_map(values, base.size)
    scaled = np.clip((values - vmin) / (vmax - vmin), 0.0, 1.0)
    indices = np.rint(np.nan_to_num(scaled) * 255.0).astype(np.uint8)
    heat = Image.fromarray(_colour_table(cmap)[indices], mode="RGB")
    blended = np.array(Image.blend(base, heat, alpha))
    if threshold is not None:
        blended[_outline(values > threshold)] = _OUTLINE_COLOUR
    return Image.fromarray(blended, mode="RGB")


def mask_image(mask: np.ndarray) -> Image.Image:
    """A binary mask as a black-and-white RGB image.

    Args:
        mask: Shape ``(H, W)``; values ``> 0`` are shown white.

    Returns:
        RGB image of size ``(W, H)``.
    """
    binary = np.asarray(mask) > 0
    if binary.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {binary.shape}")
    return Image.fromarray(np.where(binary, 255, 0).astype(np.uint8), mode="L").convert("RGB")


def render_panel(
    image: Image.Image,
    ground_truth: np.ndarray | None,
    anomaly_map: np.ndarray,
    threshold: float | None,
    vmin: float,
    vmax: float,
    title: str = "",
) -> Image.Image:
    """Side-by-side evaluation panel: image, ground truth, heat-map overlay, predicted mask.

    Args:
        image: The model's view of the image (after resize and crop), size ``(S, S)``.
        ground_truth: Ground-truth mask, shape ``(S, S)``, or ``None`` (shown empty).
        anomaly_map: Anomaly map, shape ``(S, S)``.
        threshold: Pixel threshold of the predicted mask (``map > threshold``); ``None`` shows
            an empty predicted mask.
        vmin: Bottom of the colour scale.
        vmax: Top of the colour scale.
        title: Text written above the tiles.

    Returns:
        RGB image of size ``(4 S, S + 16)``.
    """
    base = image.convert("RGB")
    width, height = base.size
    values = _fit_map(np.asarray(anomaly_map, dtype=np.float32), base.size)
    truth = np.zeros((height, width), dtype=bool) if ground_truth is None else np.asarray(ground_truth) > 0
    predicted = values > threshold if threshold is not None else np.zeros_like(truth)
    tiles = [base, mask_image(truth), overlay_heatmap(base, values, threshold, vmin, vmax), mask_image(predicted)]
    panel = Image.new("RGB", (4 * width, height + _LABEL_HEIGHT), (0, 0, 0))
    for index, tile in enumerate(tiles):
        panel.paste(tile, (index * width, _LABEL_HEIGHT))
    ImageDraw.Draw(panel).text((4, 2), title, fill=(255, 255, 255))
    return panel
