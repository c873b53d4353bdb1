"""Images to PaDiM patch embeddings: the truncated backbone followed by the channel reduction."""

from __future__ import annotations

from collections.abc import Iterator

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
        self._stage_cache: list[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        """Device of the backbone."""
        return self.backbone.device

    @property
    def micro_batch(self) -> int | None:
        """Images per network call on a CPU (``None``: the whole batch, as on a GPU)."""
        return self.backbone.spec.cpu_micro_batch if self.device.type == "cpu" else None

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device, normalise ``uint8`` pixels there, and use channels-last.

        Args:
            images: Shape ``(B, 3, S, S)``, normalised floats or ``uint8`` pixels.

        Returns:
            Normalised float images in channels-last layout on the backbone's device.
        """
        device = self.device
        images = images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float() * self.pixel_scale.to(device) + self.pixel_shift.to(device)
        # Channels-last feeds oneDNN's and cuDNN's fastest convolutions (the network is converted
        # too): on 2 CPU cores it ran EfficientNet-Lite0 twice as fast (BENCHMARKS.md).
        return images.contiguous(memory_format=torch.channels_last)

    def tap(self, images: torch.Tensor) -> Iterator[list[torch.Tensor]]:
        """Run the truncated network on a batch, one micro-batch at a time on a CPU.

        Small batches keep each layer's activations in the CPU caches: EfficientNet-Lite0 ran
        about twice as fast in calls of 4 images as in one call of 32, and the peak memory of a
        batch shrinks by the same factor. On a GPU the whole batch goes in one call. Each
        micro-batch is prepared (:meth:`prepare`) just before its call, while it is in cache.

        Args:
            images: Shape ``(B, 3, S, S)``, ``uint8`` pixels or normalised floats, any device.

        Yields:
            The tapped feature maps of each micro-batch, float32.
        """
        step = self.micro_batch or max(1, images.shape[0])
        for start in range(0, images.shape[0], step):
            chunk = self.prepare(images[start : start + step])
            if self.amp_dtype is not None and chunk.device.type == "cuda":
                with torch.autocast(device_type="cuda", dtype=self.amp_dtype):
                    features = self.network(chunk)
                yield [f.float() for f in features]
            else:
                yield self.network(chunk)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped maps of a whole batch (the micro-batches concatenated).

        Args:
            images: Shape ``(B, 3, S, S)``, ``uint8`` pixels or normalised floats, any device.

        Returns:
            Float32 maps ``(B, C_i, H_i, W_i)`` of every tap, shallow first, on the backbone's device.
        """
        parts = list(self.tap(images))
        if len(parts) == 1:
            return list(parts[0])
        return [torch.cat(column) for column in zip(*parts, strict=True)]

    @torch.inference_mode()
    def stage_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The embedding's channels of each stage for a whole batch, at each stage's resolution.

        What the upsampled embedding is made of, without the upsampling: each micro-batch's
        selected channels are written into buffers kept between calls (a batch's maps are about
        8 MB at d = 100; allocating them afresh every batch costs page faults).

        Args:
            images: Shape ``(B, 3, S, S)``, ``uint8`` pixels or normalised floats, any device.

        Returns:
            Float32 maps ``(B, c_i, H_i, W_i)`` (channels-last), one per stage with kept channels,
            on the backbone's device. They are overwritten by the next call: use them before.

        Raises:
            ValueError: If the projector mixes the stages (a projection).
        """
        batch = images.shape[0]
        start = 0
        maps: list[torch.Tensor] = []
        for features in self.tap(images):
            n = features[0].shape[0]
            if not maps:
                counts = self.projector.stage_counts()
                if counts is None:
                    raise ValueError("this channel reduction mixes the stages; use the embedding")
                kept = [(f.shape[2], f.shape[3], c) for f, c in zip(features, counts, strict=True) if c > 0]
                maps = self._stage_buffers(batch, kept, features[0].device)
            views = [m[start : start + n] for m in maps]
            self.projector.select_stages(features, out=views)
            start += n
        return [m[:batch].permute(0, 3, 1, 2) for m in maps]

    def _stage_buffers(
        self, batch: int, shapes: list[tuple[int, int, int]], device: torch.device
    ) -> list[torch.Tensor]:
        """Buffers ``(>= batch, H_i, W_i, c_i)`` for :meth:`stage_maps`, reused while they fit."""
        cached = self._stage_cache
        fits = len(cached) == len(shapes) and all(
            b.shape[0] >= batch and tuple(b.shape[1:]) == s and b.device == device
            for b, s in zip(cached, shapes, strict=True)
        )
        if not fits:
            cached = [torch.empty(batch, *shape, dtype=torch.float32, device=device) for shape in shapes]
            self._stage_cache = cached
        return cached

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images.

        Args:
            images: Shape ``(B, 3, S, S)`` (any device; moved to the backbone's): normalised
                floats, or ``uint8`` pixels, which are normalised here on the device.

        Returns:
            Float32 embeddings, shape ``(B, d, S/4, S/4)``, in channels-last memory format (each
            patch's ``d`` values contiguous, as the statistics and the scoring read them), on the
            backbone's device.
        """
        projector = self.projector.to(self.device)
        parts = [projector(features).float() for features in self.tap(images)]
        embedding = parts[0] if len(parts) == 1 else torch.cat(parts)
        return embedding.contiguous(memory_format=torch.channels_last)
