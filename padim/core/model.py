"""The fitted PaDiM model, its thresholds and its provenance.

:class:`PadimModel` holds per-Gaussian means ``(G, d)`` and whitening factors ``(G, d, d)`` and turns
a batch of images into anomaly maps ``(B, S, S)`` and image scores ``(B,)``. It is re-entrant: what
it builds lazily (the backbone, the factor's triangle blocks, the blur operators) is built once
under a lock and only read afterwards, so task threads share one model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from padim.core.alignment import register_images
from padim.core.anomaly_map import AnomalyMapGenerator, image_scores
from padim.core.backbones import Backbone, get_backbone, get_spec
from padim.core.config import PadimConfig
from padim.core.embedding import EmbeddingProjector
from padim.core.execution import resolve_device, use_fast_path
from padim.core.features import FeatureBatch, FeatureExtractor
from padim.core.geometry import grid_size
from padim.core.mahalanobis import (
    TriangleBlocks,
    mahalanobis_distances,
    triangle_blocks,
)
from padim.core.preprocessing import Preprocessor
from padim.core.scoring import TRIANGLE_BYTES, banded_distances, gaussian_distances
from padim.core.statistics import GaussianAccumulator
from padim.settings import ComputePath, Precision, Runtime


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
            The batch's features (see :class:`~padim.core.features.FeatureBatch`).
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
        scored at once (:func:`~padim.core.mahalanobis.mahalanobis_distances`). Both give the same
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
