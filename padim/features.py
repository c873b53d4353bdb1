"""Images to PaDiM patch embeddings: the truncated backbone followed by the channel reduction."""

from __future__ import annotations

import torch
from torch import nn

from padim.backbones import Backbone
from padim.embedding import EmbeddingProjector


class FeatureExtractor(nn.Module):
    """Compute ``(B, d, H/4, W/4)`` embeddings from normalised images.

    Args:
        backbone: Truncated network with its description.
        projector: Channel reduction (random subset or projection).
        amp_dtype: Optional autocast dtype for the backbone on CUDA (``torch.float16`` or
            ``torch.bfloat16``); embeddings are returned in float32 either way.
    """

    def __init__(
        self, backbone: Backbone, projector: EmbeddingProjector, amp_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.network = backbone.network
        self.projector = projector
        self.amp_dtype = amp_dtype
        std = torch.tensor(backbone.spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(backbone.spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std == x * scale + shift, for uint8 input normalised on the device.
        self.register_buffer("pixel_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("pixel_shift", -mean / std, persistent=False)

    @property
    def device(self) -> torch.device:
        """Device of the backbone."""
        return self.backbone.device

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images.

        Args:
            images: Shape ``(B, 3, S, S)`` (any device; moved to the backbone's): normalised
                floats, or ``uint8`` pixels, which are normalised here on the device.

        Returns:
            Float32 embeddings, shape ``(B, d, S/4, S/4)``, on the backbone's device.
        """
        device = self.device
        if images.dtype == torch.uint8:
            images = images.to(device, non_blocking=True).float()
            images = images * self.pixel_scale.to(device) + self.pixel_shift.to(device)
        if device.type == "cuda":
            # channels-last feeds cuDNN's fastest convolution kernels (the network is converted too).
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        else:
            images = images.to(device, non_blocking=True)
        if self.amp_dtype is not None and device.type == "cuda":
            with torch.autocast(device_type="cuda", dtype=self.amp_dtype):
                features = self.network(images)
            features = [f.float() for f in features]
        else:
            features = self.network(images)
        return self.projector.to(device)(features).float()
