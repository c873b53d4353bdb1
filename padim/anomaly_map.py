"""From patch distances to a smoothed anomaly map and an image score.

The distance grid (stride 4) is upsampled bilinearly to the model input size and smoothed with a
Gaussian blur (sigma 4, kernel ``2 * int(4 sigma + 0.5) + 1 = 33``, reflect padding without
repeating the edge sample, i.e. ``scipy.ndimage.gaussian_filter(mode="mirror", truncate=4)``), as in
the paper and anomalib. The image score is the maximum of the map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float, size: int | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel.

    Args:
        sigma: Standard deviation in pixels (> 0).
        size: Odd kernel length; default ``2 * int(4 * sigma + 0.5) + 1``.

    Returns:
        Float32 tensor of shape ``(size,)`` summing to one.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if size is None:
        size = 2 * int(4.0 * sigma + 0.5) + 1
    if size % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {size}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    kernel = torch.exp(-(x**2) / (2.0 * sigma**2))
    return (kernel / kernel.sum()).float()


class AnomalyMapGenerator(nn.Module):
    """Upsample and blur patch distances into an anomaly map.

    Args:
        output_size: Side ``S`` of the square model input.
        sigma: Blur standard deviation; 0 disables the blur.
    """

    def __init__(self, output_size: int, sigma: float = 4.0) -> None:
        super().__init__()
        self.output_size = output_size
        self.sigma = sigma
        kernel = gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)

    def blur(self, maps: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with reflect padding.

        Args:
            maps: Shape ``(B, 1, H, W)``.

        Returns:
            Blurred maps, same shape.
        """
        if self.sigma <= 0:
            return maps
        kernel = self.kernel.to(device=maps.device, dtype=maps.dtype)
        half = kernel.numel() // 2
        maps = F.conv2d(F.pad(maps, (half, half, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        return F.conv2d(F.pad(maps, (0, 0, half, half), mode="reflect"), kernel.view(1, 1, -1, 1))

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        """Compute anomaly maps.

        Args:
            distances: Patch distances, shape ``(B, h, w)``.

        Returns:
            Anomaly maps, shape ``(B, S, S)``, float32.
        """
        maps = distances.float().unsqueeze(1)
        maps = F.interpolate(maps, size=(self.output_size, self.output_size), mode="bilinear", align_corners=False)
        return self.blur(maps).squeeze(1)


def image_scores(anomaly_maps: torch.Tensor) -> torch.Tensor:
    """Image scores: the maximum of each map.

    Args:
        anomaly_maps: Shape ``(B, S, S)``.

    Returns:
        Shape ``(B,)``.
    """
    return anomaly_maps.flatten(1).amax(dim=1)
