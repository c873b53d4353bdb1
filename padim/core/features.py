"""Images to PaDiM features: the truncated backbone followed by the channel reduction.

One backbone pass gives a :class:`FeatureBatch`: the kept channels of each stage at the stage's
own resolution (what the fast CPU fit and score paths read), or the raw tapped maps when the
channel reduction is a projection. The upsampled ``(B, d, H, W)`` embedding that the plain paths
read is derived from it on demand, at most once per batch. Nothing is kept between calls: every
call allocates its own tensors, so one extractor serves any number of threads at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from padim.core.backbones import Backbone
from padim.core.embedding import EmbeddingProjector


@dataclass
class FeatureBatch:
    """The features of one batch of images, from a single backbone pass.

    Exactly one of ``stage_maps``, ``taps`` and a precomputed embedding is the source; the
    embedding is built from it the first time :meth:`embedding` is called.

    Attributes:
        projector: The channel reduction the features belong to.
        grid: ``(H, W)`` of the patch grid (the first tap's resolution).
        stage_maps: Kept channels of each stage, shapes ``(B, c_i, H_i, W_i)`` (channels-last),
            in channel order, when the reduction keeps channels per stage; else ``None``.
        taps: Raw tapped maps ``(B, C_i, H_i, W_i)`` when the reduction mixes the stages (a
            projection); else ``None``.
    """

    projector: EmbeddingProjector
    grid: tuple[int, int]
    stage_maps: list[torch.Tensor] | None = None
    taps: list[torch.Tensor] | None = None
    _embedding: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_embedding(cls, projector: EmbeddingProjector, embedding: torch.Tensor) -> FeatureBatch:
        """Wrap an embedding computed elsewhere (only the plain paths can read it).

        Args:
            projector: The channel reduction the embedding was made with.
            embedding: Shape ``(B, d, H, W)``.

        Returns:
            The batch.
        """
        if embedding.ndim != 4 or embedding.shape[1] != projector.out_channels:
            raise ValueError(
                f"embedding must have shape (B, {projector.out_channels}, H, W), got {tuple(embedding.shape)}"
            )
        return cls(projector=projector, grid=(embedding.shape[2], embedding.shape[3]), _embedding=embedding)

    @property
    def size(self) -> int:
        """Number of images ``B``."""
        source = self.stage_maps or self.taps
        if source:
            return int(source[0].shape[0])
        return int(self._embedding.shape[0]) if self._embedding is not None else 0

    def embedding(self) -> torch.Tensor:
        """The upsampled embedding, built once.

        Returns:
            Float32 ``(B, d, H, W)`` in channels-last memory format (each patch's ``d`` values
            contiguous, as the statistics and the scoring read them).
        """
        if self._embedding is None:
            if self.stage_maps is not None:
                embedding = self.projector.embed_stages(self.stage_maps, self.grid)
            elif self.taps is not None:
                embedding = self.projector(self.taps)
            else:
                raise ValueError("the feature batch holds no features")
            self._embedding = embedding.float().contiguous(memory_format=torch.channels_last)
        return self._embedding


class FeatureExtractor(nn.Module):
    """Compute the features of normalised images (see :class:`FeatureBatch`).

    The extractor holds the network, the channel reduction and two normalisation constants, and
    nothing that changes between calls: it may be called from several threads at once.

    Args:
        backbone: Truncated network with its description.
        projector: Channel reduction (random subset or projection).
        amp_dtype: Optional autocast dtype for the backbone on CUDA (``torch.float16`` or
            ``torch.bfloat16``); features are returned in float32 either way.
    """

    def __init__(self, backbone: Backbone, projector: EmbeddingProjector, amp_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.network = backbone.network
        self.projector = projector.to(backbone.device)
        self.amp_dtype = amp_dtype
        std = torch.tensor(backbone.spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(backbone.spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std == x * scale + shift, for uint8 input normalised on the device.
        self.register_buffer("pixel_scale", (1.0 / (255.0 * std)).to(backbone.device), persistent=False)
        self.register_buffer("pixel_shift", (-mean / std).to(backbone.device), persistent=False)

    @property
    def device(self) -> torch.device:
        """Device of the backbone."""
        return self.backbone.device

    @property
    def micro_batch(self) -> int | None:
        """Images per network call on a CPU (``None``: the whole batch, as on a GPU)."""
        return self.backbone.micro_batch

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device, normalise ``uint8`` pixels there, and use channels-last.

        Args:
            images: Shape ``(B, 3, S, S)``, normalised floats or ``uint8`` pixels.

        Returns:
            Normalised float images in channels-last layout on the backbone's device.
        """
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float() * self.pixel_scale + self.pixel_shift
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
                    features = self.backbone.tap(chunk)
                yield [f.float() for f in features]
            else:
                yield self.backbone.tap(chunk)

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
        """The embedding's channels of each stage, at each stage's resolution (see :meth:`extract`).

        Args:
            images: Shape ``(B, 3, S, S)``, ``uint8`` pixels or normalised floats, any device.

        Returns:
            Float32 maps ``(B, c_i, H_i, W_i)`` (channels-last), one per stage with kept channels.
        """
        return self._selected_stages(images)[0]

    def _selected_stages(self, images: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """The embedding's channels of each stage for a whole batch, at each stage's resolution.

        What the upsampled embedding is made of, without the upsampling: each micro-batch's
        selected channels are written into tensors allocated for this call.

        Args:
            images: Shape ``(B, 3, S, S)``, ``uint8`` pixels or normalised floats, any device.

        Returns:
            Float32 maps ``(B, c_i, H_i, W_i)`` (channels-last), one per stage with kept channels,
            on the backbone's device, and the ``(H, W)`` of the first tap (the patch grid).

        Raises:
            ValueError: If the projector mixes the stages (a projection).
        """
        counts = self.projector.stage_counts()
        if counts is None:
            raise ValueError("this channel reduction mixes the stages; use the embedding")
        batch = images.shape[0]
        start = 0
        maps: list[torch.Tensor] = []
        grid = (0, 0)
        for features in self.tap(images):
            n = features[0].shape[0]
            if not maps:
                grid = (int(features[0].shape[2]), int(features[0].shape[3]))
                maps = [
                    torch.empty(batch, f.shape[2], f.shape[3], c, dtype=torch.float32, device=f.device)
                    for f, c in zip(features, counts, strict=True)
                    if c > 0
                ]
            self.projector.select_stages(features, out=[m[start : start + n] for m in maps])
            start += n
        return [m.permute(0, 3, 1, 2) for m in maps], grid

    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> FeatureBatch:
        """The features of a batch, from one backbone pass.

        Args:
            images: Shape ``(B, 3, S, S)``: ``uint8`` pixels or normalised floats, any device.

        Returns:
            Stage maps when the channel reduction keeps channels per stage, else the tapped maps.
        """
        if self.projector.stage_counts() is not None:
            maps, grid = self._selected_stages(images)
            return FeatureBatch(self.projector, grid, stage_maps=maps)
        taps = self.features(images)
        return FeatureBatch(self.projector, (int(taps[0].shape[2]), int(taps[0].shape[3])), taps=taps)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch of images.

        Args:
            images: Shape ``(B, 3, S, S)`` (any device; moved to the backbone's): normalised
                floats, or ``uint8`` pixels, which are normalised here on the device.

        Returns:
            Float32 embeddings, shape ``(B, d, S/4, S/4)``, in channels-last memory format, on
            the backbone's device.
        """
        return self.extract(images).embedding()
