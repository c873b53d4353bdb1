"""Fitting a model from batches of normal images.

:class:`PadimFitter` embeds batches and folds them into a
:class:`~padim.core.statistics.GaussianAccumulator`; :func:`build_model` finalises the statistics
into a :class:`~padim.core.model.PadimModel`. A fitter holds images until its buffer fills, so it
is owned by the one job that created it.
"""

from __future__ import annotations

import torch

from padim.core.alignment import augment_images, pixel_gray, register_images
from padim.core.backbones import BackboneSpec, get_backbone, get_spec
from padim.core.cell_statistics import CellLayout, CellStatistics
from padim.core.config import PadimConfig
from padim.core.embedding import EmbeddingProjector, aggregate_neighbourhood
from padim.core.execution import resolve_device, use_fast_path
from padim.core.features import FeatureBatch, FeatureExtractor
from padim.core.geometry import grid_size, new_projector
from padim.core.mahalanobis import (
    whitening_from_accumulator,
)
from padim.core.model import PadimModel, Thresholds, TrainingInfo
from padim.core.preprocessing import Preprocessor
from padim.core.statistics import GaussianAccumulator, pool_positions
from padim.core.update_buffer import UpdateBuffer
from padim.settings import ComputePath, Precision, Runtime


def cell_layout(projector: EmbeddingProjector, spec: BackboneSpec, grid: tuple[int, int]) -> CellLayout | None:
    """The channel groups that nearest upsampling repeats over grid cells, if the layout has them.

    Channel selection keeps the stages in order, and a stage of stride ``s`` repeats over
    ``s / stride_0``-sided cells when the grid divides evenly; a projection mixes channels
    (``None``). :class:`PadimFitter` also checks the stage maps' sizes on the first batch.

    Args:
        projector: The embedding's channel reduction.
        spec: The backbone's taps.
        grid: ``(H, W)`` of the patch grid.

    Returns:
        The structure, or ``None`` when there is none to exploit.
    """
    counts = projector.stage_counts()
    if counts is None or len(counts) != len(spec.strides) or any(s % spec.strides[0] for s in spec.strides):
        return None
    groups = tuple((c, s // spec.strides[0]) for c, s in zip(counts, spec.strides, strict=True) if c > 0)
    try:
        return CellLayout(grid, groups)
    except ValueError:
        return None


class PadimFitter:
    """Accumulate the statistics of normal images for one configuration.

    A fitter is owned by one job (one thread): it holds images until its buffer fills.

    Args:
        config: Model options.
        device: Compute device (``"auto"`` picks CUDA when present).
        accumulator: Existing statistics to continue from (incremental refit), or ``None``.
        amp_dtype: Optional reduced precision for the backbone on CUDA.
        projector: The channel reduction stored with the model being refit (``model.projector``);
            default: drawn from the configuration's seed. Passing the stored one guarantees that
            new images are embedded with exactly the channels of the existing statistics.
        path: ``"auto"``, ``"fast"`` or ``"plain"`` (see :func:`use_fast_path`).
        runtime: Where the backbone runs (:data:`~padim.settings.Runtime`).
        precision: Arithmetic of an OpenVINO backbone (:data:`~padim.settings.Precision`).
        reference: Gray registration reference ``(S, S)`` (``registration="phase"``), as
            :func:`padim.io.loading.load_reference` reads it from ``config.reference``; default: the
            first image this fitter sees (refused when ``config.reference`` names one).
    """

    def __init__(
        self,
        config: PadimConfig,
        device: str | torch.device | None = "cpu",
        accumulator: GaussianAccumulator | None = None,
        amp_dtype: torch.dtype | None = None,
        projector: EmbeddingProjector | None = None,
        path: ComputePath = "auto",
        runtime: Runtime = "auto",
        precision: Precision = "f32",
        reference: torch.Tensor | None = None,
    ) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.spec = get_spec(config.backbone)
        self.backbone = get_backbone(config.backbone, config.weights, self.device, runtime, precision)
        self.projector = (projector if projector is not None else new_projector(config)).to(self.device)
        self.extractor = FeatureExtractor(self.backbone, self.projector, amp_dtype=amp_dtype)
        h, w = grid_size(config, self.spec)
        dim = self.projector.out_channels
        if accumulator is None:
            accumulator = GaussianAccumulator(h * w, dim, device=self.device)
        elif (accumulator.num_positions, accumulator.dim) != (h * w, dim):
            raise ValueError(
                f"existing statistics have P={accumulator.num_positions}, d={accumulator.dim}; "
                f"this configuration needs P={h * w}, d={dim}"
            )
        self._accumulator = accumulator
        self._buffer = UpdateBuffer(accumulator)
        fast = use_fast_path(path, self.device) and config.neighbourhood == 1  # averaging needs the embedding
        layout = cell_layout(self.projector, self.spec, (h, w)) if fast else None
        self._cells = CellStatistics(accumulator, layout) if layout is not None else None
        if reference is None and config.registration != "none" and config.reference is not None:
            raise ValueError(
                f"config.reference names the registration reference {config.reference!r}: read it with "
                "padim.io.loading.load_reference and pass it as reference="
            )
        self.reference = reference
        self._generator = torch.Generator().manual_seed(config.augment_seed)

    @property
    def needs_images(self) -> bool:
        """Whether :meth:`update` needs the images themselves (features cannot be augmented)."""
        return self.config.augment_copies > 0

    def align(self, images: torch.Tensor) -> torch.Tensor:
        """Register a batch onto the reference when the configuration asks for it.

        Args:
            images: Shape ``(B, 3, S, S)``, ``uint8`` or normalised.

        Returns:
            The registered images (the same tensor when registration is off). Without a
            reference yet, the batch's first image becomes the reference.
        """
        if self.config.registration == "none" or images.shape[0] == 0:
            return images
        if self.reference is None:
            self.reference = pixel_gray(images[:1], self.spec.mean, self.spec.std)[0].cpu()
        return register_images(images, self.reference, self.spec.mean, self.spec.std)

    @property
    def accumulator(self) -> GaussianAccumulator:
        """The statistics, with every image passed to :meth:`update` folded in."""
        self._buffer.flush()
        if self._cells is not None:
            self._cells.flush()
        return self._accumulator

    @property
    def uses_cells(self) -> bool:
        """Whether images go to the per-cell statistics (:class:`CellStatistics`)."""
        return self._cells is not None

    def flush(self) -> None:
        """Fold the images held by :meth:`update` into the statistics and free the buffers."""
        self._buffer.release()
        if self._cells is not None:
            self._cells.flush()

    def preprocessor(self, normalize: bool = True) -> Preprocessor:
        """Image transform matching this configuration and backbone (``normalize=False``: uint8)."""
        return Preprocessor(self.config, self.spec.mean, self.spec.std, normalize=normalize)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Embed a batch.

        Args:
            images: Shape ``(B, 3, S, S)``.

        Returns:
            Shape ``(B, d, S/4, S/4)``.
        """
        return self.extractor(images)

    def update(self, images: torch.Tensor | FeatureBatch) -> None:
        """Fold a batch of images (or their features) into the statistics.

        On the fast path the selected stage maps go to :class:`CellStatistics` and the upsampled
        embedding is never built; otherwise the embeddings are collected and folded in ~128
        images at a time (:class:`UpdateBuffer`). Either way the images are held until the
        buffer fills; reading :attr:`accumulator` or calling :meth:`flush` folds in what is held.
        Images are registered first (``registration``); their ``augment_copies`` random copies
        are folded in after them; embeddings are averaged over ``neighbourhood`` first.

        Args:
            images: Shape ``(B, 3, S, S)``, or the batch's features from this configuration's
                extractor (e.g. computed once for scoring and fitting, as calibration does).

        Raises:
            ValueError: If the images are not of the model's input size.
        """
        if isinstance(images, FeatureBatch):
            if self.needs_images:
                raise ValueError("an augmenting fitter needs the images, not their features")
            self._fold(images)
            return
        images = self.align(images)
        self._fold(self.extractor.extract(images))
        if self.config.augment_copies:
            copies = augment_images(images, self.config, self._generator, self.spec.mean, self.spec.std)
            for start in range(0, copies.shape[0], max(images.shape[0], 1)):  # batches of the caller's size
                self._fold(self.extractor.extract(copies[start : start + images.shape[0]]))

    def _fold(self, features: FeatureBatch) -> None:
        """Fold one batch's features into the statistics (cells, or the buffered embedding)."""
        if self._cells is not None and features.stage_maps is not None:
            shapes = [tuple(g.shape) for g in features.stage_maps]
            expected = self._cells.expected_shapes(features.size)
            if shapes == expected:
                self._cells.add(features.stage_maps)
                return
            if shapes[0] != expected[0]:  # the images themselves do not fit the model
                raise ValueError(f"images give stage maps {shapes}, expected {expected} for this model")
        self._buffer.add(aggregate_neighbourhood(features.embedding(), self.config.neighbourhood))


def images_in(accumulator: GaussianAccumulator, config: PadimConfig) -> int:
    """Images whose patches are in the statistics: each was fitted with its ``augment_copies`` copies.

    Args:
        accumulator: The statistics.
        config: The configuration they were fitted with.

    Returns:
        ``accumulator.n / (1 + augment_copies)``.
    """
    return accumulator.n // (1 + config.augment_copies)


def build_model(
    fitter_or_config: PadimFitter | PadimConfig,
    accumulator: GaussianAccumulator | None = None,
    *,
    weights_sha256: str | None = None,
    training: TrainingInfo | None = None,
    thresholds: Thresholds | None = None,
    factor_dtype: torch.dtype = torch.float32,
    keep_statistics: bool = True,
    path: ComputePath = "auto",
    runtime: Runtime = "auto",
    precision: Precision = "f32",
    reference: torch.Tensor | None = None,
) -> PadimModel:
    """Finalise accumulated statistics into a model.

    Args:
        fitter_or_config: The fitter that accumulated the statistics, or a configuration (then
            ``accumulator`` and ``weights_sha256`` are required, e.g. after merging shards).
        accumulator: Statistics to finalise (default: the fitter's).
        weights_sha256: Identity of the backbone weights (default: the fitter's backbone).
        training: Provenance; default records only the count.
        thresholds: Calibrated thresholds, if already known.
        factor_dtype: Storage dtype of the whitening factor.
        keep_statistics: Keep the accumulator on the model for incremental refits.
        path: Scoring implementation of the model (see :func:`use_fast_path`).
        runtime: Where the model's backbone runs.
        precision: Arithmetic of an OpenVINO backbone.
        reference: Registration reference ``(S, S)`` (default: the fitter's); required for
            ``registration="phase"`` when building from a configuration.

    Returns:
        The fitted model, on the accumulator's device.
    """
    if isinstance(fitter_or_config, PadimFitter):
        config = fitter_or_config.config
        accumulator = accumulator or fitter_or_config.accumulator
        weights_sha256 = weights_sha256 or fitter_or_config.backbone.weights_sha256
        projector = fitter_or_config.projector
        reference = reference if reference is not None else fitter_or_config.reference
    else:
        config = fitter_or_config
        projector = new_projector(config)
        if accumulator is None or weights_sha256 is None:
            raise ValueError("building a model from a configuration needs the accumulator and weights_sha256")
    h, w = grid_size(config, get_spec(config.backbone))
    if (accumulator.num_positions, accumulator.dim) != (h * w, projector.out_channels):
        raise ValueError(
            f"statistics have P={accumulator.num_positions}, d={accumulator.dim}; "
            f"the configuration needs P={h * w}, d={projector.out_channels}"
        )
    mean, factor = finalize_gaussians(accumulator, config, factor_dtype)
    if config.registration != "none" and reference is None:
        raise ValueError(
            "a model with registration 'phase' needs its reference image: pass reference= "
            "(padim.io.loading.load_reference reads config.reference)"
        )
    training = training or TrainingInfo(n_train=images_in(accumulator, config), training_set_sha256="")
    model = PadimModel(
        config=config,
        projector=projector.to(accumulator.device),
        mean=mean,
        factor=factor,
        weights_sha256=weights_sha256,
        training=training,
        thresholds=thresholds,
        accumulator=accumulator if keep_statistics else None,
        path=path,
        runtime=runtime,
        precision=precision,
        reference=reference if config.registration != "none" else None,
    )
    return model.to(accumulator.device)


def finalize_gaussians(
    accumulator: GaussianAccumulator, config: PadimConfig, factor_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and whitening factors of the Gaussians ``config.statistics`` asks for.

    Args:
        accumulator: Per-position statistics ``(P, d)``.
        config: Model options (``statistics``, ``eps``, ``covariance``).
        factor_dtype: Storage dtype of the factors.

    Returns:
        ``mean (G, d)`` float32 and ``factor (G, d, d)``, ``G`` = :func:`num_gaussians`: the
        per-position Gaussians, the shared one (:func:`~padim.core.statistics.pool_positions`), or
        both (the shared one last).
    """
    parts = []
    if config.statistics in ("position", "both"):
        parts.append(
            (
                accumulator.mean.float(),
                whitening_from_accumulator(accumulator, config.eps, config.covariance, dtype=factor_dtype),
            )
        )
    if config.statistics in ("shared", "both"):
        pooled = pool_positions(accumulator)
        parts.append(
            (pooled.mean.float(), whitening_from_accumulator(pooled, config.eps, config.covariance, dtype=factor_dtype))
        )
    if len(parts) == 1:
        return parts[0]
    return torch.cat([m for m, _ in parts]), torch.cat([f for _, f in parts])
