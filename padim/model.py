"""The PaDiM model: fitting from batches of normal images and scoring new ones.

:class:`PadimFitter` embeds batches and folds them into a :class:`GaussianAccumulator`;
:func:`build_model` finalises the statistics into a :class:`PadimModel`, which holds the per-
position means ``(P, d)`` and whitening factors ``(P, d, d)`` and turns a batch of images into
anomaly maps ``(B, S, S)`` and image scores ``(B,)``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from padim.alignment import augment_images, load_reference, pixel_gray, register_images
from padim.anomaly_map import AnomalyMapGenerator, image_scores
from padim.backbones import Backbone, BackboneSpec, get_backbone, get_spec
from padim.cell_statistics import CellLayout, CellStatistics
from padim.config import PadimConfig
from padim.embedding import EmbeddingProjector, aggregate_neighbourhood, build_projector
from padim.features import FeatureBatch, FeatureExtractor
from padim.mahalanobis import (
    TriangleBlocks,
    mahalanobis_distances,
    shared_distances,
    tolerant_distances,
    triangle_blocks,
    whitened_norms,
    whitening_from_accumulator,
)
from padim.preprocessing import Preprocessor
from padim.settings import CPU_BATCH_SIZE, GPU_BATCH_SIZES, ComputePath, Precision, Runtime
from padim.statistics import GaussianAccumulator, UpdateBuffer, pool_positions


def resolve_channels(config: PadimConfig, spec: BackboneSpec) -> int:
    """Embedding dimension ``d`` of a configuration.

    Args:
        config: Model options.
        spec: The backbone's description.

    Returns:
        ``config.channels``, the backbone default when unset, or ``D`` for ``"all"``.
    """
    if config.channel_selection == "all":
        return spec.total_channels
    return config.channels if config.channels is not None else spec.default_channels


def grid_size(config: PadimConfig, spec: BackboneSpec) -> tuple[int, int]:
    """Side lengths ``(h, w)`` of the patch grid (stride of the first tap).

    Args:
        config: Model options.
        spec: The backbone's description.

    Returns:
        ``(S / stride, S / stride)``.
    """
    side = -(-config.input_size // spec.strides[0])
    return side, side


def num_gaussians(config: PadimConfig, grid: tuple[int, int]) -> int:
    """Number of Gaussians a model of ``config`` holds (rows of its ``mean`` and ``factor``).

    Args:
        config: Model options (``statistics``).
        grid: ``(H, W)`` of the patch grid.

    Returns:
        ``H W`` per-position Gaussians, 1 shared one, or ``H W + 1`` (the shared one last).
    """
    positions = grid[0] * grid[1]
    return {"position": positions, "shared": 1, "both": positions + 1}[config.statistics]


def gaussian_distances(
    embeddings: torch.Tensor, mean: torch.Tensor, factor: torch.Tensor, config: PadimConfig
) -> torch.Tensor:
    """Distances of every patch under a configuration's statistics and scoring options.

    The plain route of the remedies for unaligned parts: the neighbourhood average of the
    embeddings, then the per-position Gaussians (tolerant within ``config.tolerance``), the
    shared Gaussian, or the smaller of both.

    Args:
        embeddings: Shape ``(B, d, H, W)``.
        mean: Means of :func:`num_gaussians` Gaussians, shape ``(G, d)``.
        factor: Their whitening matrices ``(G, d, d)`` (or :class:`TriangleBlocks` for ``"position"``).
        config: Model options.

    Returns:
        Shape ``(B, H, W)``.
    """
    embeddings = aggregate_neighbourhood(embeddings, config.neighbourhood)
    positions = embeddings.shape[2] * embeddings.shape[3]
    if config.statistics == "shared":
        return shared_distances(embeddings, mean, factor)
    if config.statistics == "position":
        return tolerant_distances(embeddings, mean, factor, config.tolerance)
    local = tolerant_distances(embeddings, mean[:positions], factor[:positions], config.tolerance)
    return torch.minimum(local, shared_distances(embeddings, mean[positions:], factor[positions:]))


def new_projector(config: PadimConfig) -> EmbeddingProjector:
    """Channel reduction of a configuration (deterministic: a function of the seed).

    Args:
        config: Model options.

    Returns:
        The projector every shard and every refit of this configuration shares.
    """
    spec = get_spec(config.backbone)
    return build_projector(spec.channels, resolve_channels(config, spec), config.channel_selection, config.seed)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Pick the compute device: CUDA when present for ``"auto"``/``None``.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a device.

    Returns:
        The device.

    Raises:
        ValueError: If CUDA is requested but not available.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu")
    return resolved


def auto_batch_size(config: PadimConfig, device: str | torch.device | None) -> int:
    """A batch size that fills the device: :data:`~padim.settings.CPU_BATCH_SIZE` on a CPU; on a GPU,
    :data:`~padim.settings.GPU_BATCH_SIZES` scaled with its free memory.

    The GPU figures (at 224 x 224, for an 80 GB card) keep activations, the statistics and the
    scoring temporaries well inside memory; they scale linearly with free memory and inversely
    with the input area.

    Args:
        config: Model options (backbone, input size).
        device: Target device.

    Returns:
        Images per batch.
    """
    target = resolve_device(device)
    if target.type != "cuda":
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(target)
    base = GPU_BATCH_SIZES.get(config.backbone, 64)
    scale = (free / (70 * 1024**3)) * (224 * 224) / (config.input_size**2)
    return int(max(8, min(1024, base * scale)) // 8 * 8)


def use_fast_path(path: ComputePath, device: torch.device) -> bool:
    """Whether fitting and scoring read the stage maps directly (the one place this is decided).

    The fast path (:class:`~padim.cell_statistics.CellStatistics` for the statistics,
    :func:`banded_distances` for the distances) never builds the upsampled embedding; on a CPU it
    does a fifth of the statistics' arithmetic and keeps each band of the distances in cache. On a
    GPU the plain batched products are faster (H200, ResNet18: 21,300 against 18,000 images/s,
    BENCHMARKS.md). Both give the same numbers (tested); a layout the fast path cannot serve
    (a projection, stage maps that do not tile the grid) uses the plain one.

    Args:
        path: ``"auto"``, ``"fast"`` or ``"plain"``.
        device: Where the work runs.

    Returns:
        True for the fast path.
    """
    if path not in ("auto", "fast", "plain"):
        raise ValueError(f"path must be 'auto', 'fast' or 'plain', got {path!r}")
    return device.type == "cpu" if path == "auto" else path == "fast"


@dataclass
class Thresholds:
    """Decision thresholds calibrated on normal images only.

    Attributes:
        image: Image-score threshold; an image is anomalous when its score exceeds it.
        pixel: Anomaly-map threshold for the defect region.
        image_fpr: Target false-positive rate the image threshold was set at.
        pixel_fpr: Target false-positive rate of the pixel threshold.
        n_images: Number of held-out normal images used.
        method: How they were obtained (``"holdout"``, ``"folder"``...).
        normal_median: Median image score of the held-out normal images (the reference the
            nightly drift check compares tonight's bulk of scores with).
    """

    image: float
    pixel: float
    image_fpr: float
    pixel_fpr: float
    n_images: int
    method: str = "holdout"
    normal_median: float | None = None


@dataclass
class Prediction:
    """Output of scoring a batch.

    Attributes:
        anomaly_maps: Shape ``(B, S, S)``, float32, on the CPU.
        scores: Image scores (maximum of each map), shape ``(B,)``.
    """

    anomaly_maps: torch.Tensor
    scores: torch.Tensor


@dataclass
class TrainingInfo:
    """Provenance of a fitted model.

    Attributes:
        n_train: Number of images in the statistics.
        training_set_sha256: Digest of the sorted content hashes of the training images.
        training_images: ``(uri, sha256)`` of every image in the statistics.
        calibration_images: ``(uri, sha256)`` of the held-out normal images the thresholds were
            calibrated on (kept out of the statistics, so later refits can re-calibrate on them).
    """

    n_train: int
    training_set_sha256: str
    training_images: list[tuple[str, str]] = field(default_factory=list)
    calibration_images: list[tuple[str, str]] = field(default_factory=list)


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


TRIANGLE_BYTES = 1 << 30
"""Largest factor scored in :class:`TriangleBlocks` on a CPU (they add two thirds of its memory)."""

BAND_BYTES = 4 << 20
"""Bytes of float32 embedding scored at once by :func:`banded_distances` (fits the CPU caches)."""


def banded_distances(
    maps: list[torch.Tensor],
    mean: torch.Tensor,
    factor: torch.Tensor | TriangleBlocks,
    grid: tuple[int, int],
    projector: EmbeddingProjector | None = None,
    band_bytes: int = BAND_BYTES,
) -> torch.Tensor | None:
    """Mahalanobis distances of a batch, a band of grid rows at a time.

    Without a projector, ``maps`` are the embedding's channels of each stage
    (:meth:`padim.features.FeatureExtractor.stage_maps`) and each band's centred vectors
    ``x - mu`` are written straight from their rows (nearest upsampling and centring in one
    pass), then whitened while they are in the caches. With a projector (a projection mixes the
    stages), ``maps`` are the tapped maps and each band is embedded first. The whole batch's
    embedding (40 MB at B = 32, d = 100) is never written, transposed or allocated (an
    allocation that size is mapped from the OS and page-faulted in). The distances are those of
    :func:`padim.mahalanobis.mahalanobis_distances` on the whole embedding.

    Args:
        maps: Stage maps ``(B, c_i, H_i, W_i)`` in channel order, the first on the grid itself.
        mean: Per-position means, shape ``(P, d)``.
        factor: Whitening matrices, shape ``(P, d, d)``, or their :class:`TriangleBlocks`.
        grid: ``(H, W)`` of the patch grid.
        projector: The model's channel reduction when ``maps`` are the raw tapped maps.
        band_bytes: Target size of one band's vectors.

    Returns:
        Distances ``(B, H, W)``, or ``None`` when the maps are not the grid divided by integer
        factors (then bands would not line up; embed the whole batch instead).
    """
    height, width = grid
    ratios = []
    for feature in maps:
        h, w = feature.shape[-2:]
        if height % h or width % w or height // h != width // w:
            return None
        ratios.append(height // h)
    if ratios[0] != 1 or (projector is None and sum(m.shape[1] for m in maps) != mean.shape[1]):
        return None
    step = math.lcm(*ratios)
    batch, d = maps[0].shape[0], mean.shape[1]
    rows = max(step, band_bytes // max(4 * batch * width * d, 1) // step * step)
    if projector is None:
        buffer = torch.empty(min(rows, height), width, batch, d, dtype=mean.dtype, device=mean.device)
    norms = []
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        first, last = top * width, bottom * width
        rows_factor = factor.positions(first, last) if isinstance(factor, TriangleBlocks) else factor[first:last]
        if projector is not None:  # embed the band, then score it as a whole embedding
            part = [f[:, :, top // r : bottom // r] for f, r in zip(maps, ratios, strict=True)]
            distances = mahalanobis_distances(projector(part), mean[first:last], rows_factor)  # (B, rows, W)
            norms.append(distances.flatten(1).transpose(0, 1))
            continue
        centred = buffer[: bottom - top]  # (rows, W, B, d)
        offset = 0
        for group, r in zip(maps, ratios, strict=True):
            h, w, c = (bottom - top) // r, width // r, group.shape[1]
            source = group[:, :, top // r : bottom // r].permute(2, 3, 0, 1)  # (h, w, B, c)
            source = source[:, None, :, None].expand(h, r, w, r, batch, c)  # nearest upsampling
            target = centred.view(h, r, w, r, batch, d)[..., offset : offset + c]
            centre = mean[first:last].view(h, r, w, r, 1, d)[..., offset : offset + c]
            torch.sub(source, centre, out=target)
            offset += c
        norms.append(whitened_norms(centred.view(-1, batch, d), rows_factor))
    return torch.cat(norms).transpose(0, 1).reshape(batch, height, width)


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
        reference: Gray registration reference ``(S, S)`` (``registration="phase"``); default:
            read from ``config.reference``, else the first image this fitter sees.
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
            reference = load_reference(config, self.spec.mean, self.spec.std)
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


class PadimModel(nn.Module):
    """A fitted PaDiM model.

    A loaded model serves any number of threads at once: scoring keeps no scratch between
    calls, and what it builds lazily (the backbone, the factor's triangle blocks) is built once
    under a lock and never changed afterwards.

    Args:
        config: Options the model was fitted with.
        projector: Channel reduction, same as at fit time.
        mean: Per-position means, shape ``(P, d)``.
        factor: Per-position whitening matrices ``L^{-1}``, shape ``(P, d, d)``.
        weights_sha256: Identity of the backbone weights the statistics were computed with.
        training: Provenance of the statistics.
        thresholds: Calibrated decision thresholds, if any.
        accumulator: The raw statistics (kept for incremental refits), if available.
        path: ``"auto"``, ``"fast"`` or ``"plain"`` scoring (see :func:`use_fast_path`).
        runtime: Where the backbone runs (:data:`~padim.settings.Runtime`).
        precision: Arithmetic of an OpenVINO backbone (:data:`~padim.settings.Precision`).
        reference: Gray registration reference ``(S, S)``; required for ``registration="phase"``.

    ``mean`` and ``factor`` hold :func:`num_gaussians` Gaussians: one per position (PaDiM), one
    shared, or both (the shared one last).
    """

    def __init__(
        self,
        config: PadimConfig,
        projector: EmbeddingProjector,
        mean: torch.Tensor,
        factor: torch.Tensor,
        weights_sha256: str,
        training: TrainingInfo,
        thresholds: Thresholds | None = None,
        accumulator: GaussianAccumulator | None = None,
        path: ComputePath = "auto",
        runtime: Runtime = "auto",
        precision: Precision = "f32",
        reference: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if config.registration != "none" and reference is None:
            raise ValueError("a model with registration 'phase' needs its reference image")
        self.config = config
        self.spec = get_spec(config.backbone)
        self.projector = projector
        self.register_buffer("mean", mean.float())
        self.register_buffer("factor", factor)
        self.register_buffer("reference", reference.float() if reference is not None else None)
        self.weights_sha256 = weights_sha256
        self.training = training
        self.thresholds = thresholds
        self.accumulator = accumulator
        self.grid = grid_size(config, self.spec)
        self.anomaly_map = AnomalyMapGenerator(config.input_size, config.blur_sigma)
        self.path: ComputePath = path
        self.runtime: Runtime = runtime
        self.precision: Precision = precision
        self._extractor: FeatureExtractor | None = None
        self._lock = threading.Lock()
        self._triangles: tuple[tuple[int, torch.device, torch.dtype], TriangleBlocks | None] | None = None

    def __getstate__(self) -> dict[str, object]:
        """State for copies: everything but the lock and what is derived (the triangle blocks, the
        attached backbone, which a copy attaches again from the process's shared ones)."""
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state["_triangles"] = None
        modules = dict(state["_modules"])  # type: ignore[arg-type]
        modules.pop("_extractor", None)
        state["_modules"] = modules
        state["_extractor"] = None
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        """Restore a copy with a lock of its own."""
        super().__setstate__(state)
        self._lock = threading.Lock()

    @property
    def channels(self) -> int:
        """Embedding dimension ``d``."""
        return int(self.mean.shape[1])

    def preprocessor(self, normalize: bool = True) -> Preprocessor:
        """Image transform matching this model (``normalize=False``: uint8, normalised on the device)."""
        return Preprocessor(self.config, self.spec.mean, self.spec.std, normalize=normalize)

    def attach_backbone(self, backbone: Backbone, amp_dtype: torch.dtype | None = None) -> None:
        """Use ``backbone`` (its weights must be the ones the model was fitted with).

        Args:
            backbone: A loaded backbone of the model's kind.
            amp_dtype: Optional reduced precision for the backbone on CUDA.

        Raises:
            ValueError: If the backbone or its weights differ from the model's.
        """
        if backbone.spec.name != self.config.backbone:
            raise ValueError(f"model was fitted with {self.config.backbone}, not {backbone.spec.name}")
        if backbone.weights_sha256 != self.weights_sha256:
            raise ValueError(
                f"backbone weights {backbone.weights_sha256[:12]} differ from the model's {self.weights_sha256[:12]}"
            )
        self.to(backbone.device)
        self._extractor = FeatureExtractor(backbone, self.projector, amp_dtype=amp_dtype)

    def extractor(self) -> FeatureExtractor:
        """The feature extractor, loading the backbone on first use (once, whatever the threads)."""
        with self._lock:
            if self._extractor is None:
                device = self.mean.device
                backbone = get_backbone(
                    self.config.backbone, self.config.weights, device, self.runtime, self.precision, self.weights_sha256
                )  # the file is parsed only if its sha256 is the model's
                self.attach_backbone(backbone)
            extractor = self._extractor
        if extractor is None:
            raise RuntimeError("backbone could not be attached")
        return extractor

    def to_device(self, device: str | torch.device | None, factor_dtype: torch.dtype | None = None) -> PadimModel:
        """Move the model (and its backbone) to a device, optionally storing the factor in reduced precision.

        Call it before the model is shared between threads.

        Args:
            device: ``"auto"``, ``"cpu"``, ``"cuda"``...
            factor_dtype: ``torch.float16``/``torch.bfloat16`` to halve the factor's memory and
                bandwidth on a GPU; ``None`` keeps its dtype.

        Returns:
            ``self``.
        """
        target = resolve_device(device)
        with self._lock:
            if factor_dtype is not None:
                self.factor = self.factor.to(factor_dtype)
            self.to(target)
            if self._extractor is not None and self._extractor.device != target:
                self._extractor = None
        return self

    def scoring_factor(self) -> torch.Tensor | TriangleBlocks:
        """The factor in the form scoring uses: :class:`TriangleBlocks` on a CPU, else the matrices.

        Cholesky factors are lower triangular, and skipping their zero half made scoring's
        matrix products about 30 % faster on the CPU (BENCHMARKS.md). The blocks cost two
        thirds of the factor's memory again, so factors over :data:`TRIANGLE_BYTES` (e.g.
        WideResNet50 at d = 550) and factors that are not triangular keep the full product.
        The blocks are made once, on first use (under the model's lock), and remade if the
        factor is replaced.
        """
        factor = self.factor
        if factor.device.type != "cpu" or factor.numel() * factor.element_size() > TRIANGLE_BYTES:
            return factor
        key = (factor.data_ptr(), factor.device, factor.dtype)
        with self._lock:
            if self._triangles is None or self._triangles[0] != key:
                try:
                    blocks: TriangleBlocks | None = triangle_blocks(factor)  # checks triangularity once
                except ValueError:
                    blocks = None
                self._triangles = (key, blocks)
            blocks = self._triangles[1]
        return blocks if blocks is not None else factor

    def extract(self, images: torch.Tensor) -> FeatureBatch:
        """The features of a batch of images (one backbone pass).

        Args:
            images: Shape ``(B, 3, S, S)``: ``uint8`` pixels or floats normalised by
                :meth:`preprocessor`. Registered onto the reference first (``registration``).

        Returns:
            The batch's features (see :class:`~padim.features.FeatureBatch`).
        """
        if self.reference is not None and self.config.registration != "none":
            images = register_images(images, self.reference, self.spec.mean, self.spec.std)
        return self.extractor().extract(images)

    @torch.inference_mode()
    def distances(self, features: FeatureBatch) -> torch.Tensor:
        """Mahalanobis distance of every patch of a batch.

        On the fast path (:func:`use_fast_path`) the distances come a band of grid rows at a
        time straight from the stage maps (:func:`banded_distances`): the ``(B, P, d)``
        embedding of the whole batch never exists and each band stays in the CPU caches. On
        the plain path (and for features the fast path cannot read) the whole embedding is
        scored at once (:func:`~padim.mahalanobis.mahalanobis_distances`). Both give the same
        distances.

        Args:
            features: The batch's features.

        Returns:
            Shape ``(B, H, W)`` on the model's device.
        """
        if self.config.plain_scoring:  # a remedy for unaligned parts: the whole embedding
            embedding = features.embedding().to(self.mean.device)
            return gaussian_distances(embedding, self.mean, self.factor, self.config)
        if use_fast_path(self.path, self.mean.device):
            factor = self.scoring_factor()
            distances = None
            if features.stage_maps is not None:
                maps = [m.to(self.mean.device) for m in features.stage_maps]
                distances = banded_distances(maps, self.mean, factor, self.grid)
            elif features.taps is not None:
                taps = [t.to(self.mean.device) for t in features.taps]
                distances = banded_distances(taps, self.mean, factor, self.grid, self.projector)
            if distances is not None:
                return distances
        else:
            factor = self.factor
        return mahalanobis_distances(features.embedding().to(self.mean.device), self.mean, factor)

    @torch.inference_mode()
    def anomaly_maps(self, images: torch.Tensor | FeatureBatch) -> torch.Tensor:
        """Anomaly maps of a batch: distances, bilinear upsampling and the Gaussian blur.

        Args:
            images: Shape ``(B, 3, S, S)`` (``uint8`` pixels or floats normalised by
                :meth:`preprocessor`), or the batch's features.

        Returns:
            Shape ``(B, S, S)``, float32, on the model's device.
        """
        features = images if isinstance(images, FeatureBatch) else self.extract(images)
        return self.anomaly_map(self.distances(features))

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a batch of preprocessed images.

        Args:
            images: Shape ``(B, 3, S, S)``, normalised by :meth:`preprocessor`.

        Returns:
            Anomaly maps ``(B, S, S)`` and scores ``(B,)``, on the CPU.
        """
        maps = self.anomaly_maps(images)
        return Prediction(anomaly_maps=maps.cpu(), scores=image_scores(maps).cpu())


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
        reference: Registration reference ``(S, S)`` (default: the fitter's, else read from
            ``config.reference``); only for ``registration="phase"``.

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
        spec = get_spec(config.backbone)
        reference = load_reference(config, spec.mean, spec.std)
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
        per-position Gaussians, the shared one (:func:`~padim.statistics.pool_positions`), or
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
