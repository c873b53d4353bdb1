"""Configuration of a PaDiM model: backbone, preprocessing, embedding and statistics options.

The configuration is a pydantic model so that every entry point (library, Prefect flow parameters,
command line) validates the same way and the manifest of a model version records it verbatim.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BackboneName = Literal["efficientnet_lite0", "resnet18", "wide_resnet50_2"]
ChannelSelection = Literal["random", "semi_orthogonal", "all"]
ResizeMode = Literal["square", "shorter_side"]
CovarianceEstimator = Literal["fixed", "oas"]
StatisticsMode = Literal["position", "shared", "both"]
Registration = Literal["none", "phase"]

DEFAULT_CHANNELS: dict[str, int] = {"efficientnet_lite0": 176, "resnet18": 100, "wide_resnet50_2": 550}
"""The embedding dimension ``d`` of each backbone when ``channels`` is unset: every channel of
EfficientNet-Lite0 (the accuracy benchmark's winner), the paper's 100 and 550 for the ResNets."""


class PadimConfig(BaseModel):
    """Everything that determines a fitted model besides its training images.

    The defaults are the configuration that won the accuracy benchmark on average over both data
    sets (BENCHMARKS.md, variant ``all_no_crop``): every EfficientNet-Lite0 channel (``d = 176``)
    and the whole image resized to 224 x 224, no centre crop, so defects at the border of the
    part are seen. The paper's protocol is ``image_size=256, crop_size=224, channels=100``.

    Attributes:
        backbone: Name of the feature extractor (see :mod:`padim.core.backbones`).
        weights: Where the backbone weights come from: ``None`` for the default (the offline
            package for EfficientNet-Lite0, torchvision's download cache for ResNets), a local
            path or ``s3://`` URI of a weights file, or ``"random"`` for an explicit random
            initialisation (tests and benchmarks only).
        channels: Number ``d`` of embedding channels kept; ``None`` uses the backbone's
            default (:data:`DEFAULT_CHANNELS`). A random subset of all ``D`` channels is all of
            them, in order.
        channel_selection: ``"random"`` (the paper: a seeded random subset of ``d`` channels),
            ``"semi_orthogonal"`` (a seeded random ``D x d`` semi-orthogonal projection,
            Kim et al. 2021) or ``"all"`` (keep every channel).
        seed: Seed of the channel subset / projection.
        image_size: Side of the resized image (default 224; the paper: 256).
        crop_size: Side of the centre crop (the paper: 224), or ``None`` for no crop (default).
        resize_mode: ``"square"`` resizes to ``image_size x image_size`` (the paper);
            ``"shorter_side"`` keeps the aspect ratio (the shorter side becomes ``image_size``).
        eps: Diagonal regularisation added to each covariance (the paper: 0.01).
        covariance: ``"fixed"`` adds ``eps * I`` (the paper); ``"oas"`` shrinks each covariance
            towards a scaled identity with the Oracle Approximating Shrinkage intensity (Chen et al.
            2010; computable from the streamed statistics, unlike Ledoit-Wolf, which needs fourth
            moments of the individual vectors), then adds ``eps * I``.
        blur_sigma: Standard deviation of the Gaussian blur of the anomaly map (the paper: 4).
        statistics: (This and the options below are remedies for parts that are not aligned,
            issue 18; each default is plain PaDiM, and a model that sets ``statistics``,
            ``neighbourhood`` or ``tolerance`` is scored on the plain, whole-embedding path.)
            ``"position"`` (PaDiM: one Gaussian per patch position), ``"shared"`` (one Gaussian
            over the patches of every position: position-agnostic) or ``"both"`` (a patch's
            distance is the smaller of the two: a patch is normal when either its own position's
            Gaussian or the shared one explains it). The shared Gaussian is pooled
            exactly from the per-position statistics (law of total covariance), so fitting,
            merging shards and refits are unchanged, and a refit may switch this option.
        augment_copies: Training-time augmentation: each normal image is also fitted as this many
            randomly shifted / rotated (/ flipped) copies (0 = off). Fit time only.
        augment_seed: Seed of the copies' random transforms (deterministic per fitter stream).
        augment_shift: Largest shift of a copy, as a fraction of the input side (each axis).
        augment_rotation: Largest rotation of a copy, in degrees (either direction).
        augment_flip: Also flip copies horizontally and vertically at random (symmetric parts).
        neighbourhood: Side ``k`` (odd) of the square neighbourhood each patch embedding is
            averaged over before the Gaussians, at fit and score time (PatchCore's locally aware
            features use 3); 1 = off.
        tolerance: Tolerant scoring: a patch's distance is the smallest over the Gaussians of the
            positions within this Chebyshev radius, in patches (0 = PaDiM). Score time only: any
            fitted model can be scored with another tolerance.
        registration: ``"phase"`` translates each image (at fit and score time) onto the
            product's reference image by phase correlation before the backbone; ``"none"`` = off.
        reference: URI of the registration reference image; ``None`` lets the train flow and
            ``padim evaluate`` pick the first training image. The preprocessed reference is stored
            in the model, so scoring never reads this URI.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: BackboneName = "efficientnet_lite0"
    weights: str | None = None
    channels: int | None = Field(default=None, ge=1)
    channel_selection: ChannelSelection = "random"
    seed: int = 0
    image_size: int = Field(default=224, ge=32, le=2048)
    crop_size: int | None = Field(default=None, ge=32, le=2048)
    resize_mode: ResizeMode = "square"
    eps: float = Field(default=0.01, gt=0.0)
    covariance: CovarianceEstimator = "fixed"
    blur_sigma: float = Field(default=4.0, ge=0.0)
    statistics: StatisticsMode = "position"
    augment_copies: int = Field(default=0, ge=0, le=64)
    augment_seed: int = 0
    augment_shift: float = Field(default=0.1, ge=0.0, le=0.5)
    augment_rotation: float = Field(default=15.0, ge=0.0, le=180.0)
    augment_flip: bool = False
    neighbourhood: int = Field(default=1, ge=1, le=15)
    tolerance: int = Field(default=0, ge=0, le=8)
    registration: Registration = "none"
    reference: str | None = None

    @model_validator(mode="after")
    def _check_crop(self) -> PadimConfig:
        if self.crop_size is not None and self.crop_size > self.image_size:
            raise ValueError(f"crop_size ({self.crop_size}) cannot exceed image_size ({self.image_size})")
        if self.resize_mode == "shorter_side" and self.crop_size is None:
            raise ValueError("resize_mode 'shorter_side' needs a crop_size so that every image has the same shape")
        if self.neighbourhood % 2 == 0:
            raise ValueError(
                f"neighbourhood must be odd (1 = off, 3 = a 3 x 3 neighbourhood), got {self.neighbourhood}"
            )
        if self.reference is not None and self.registration == "none":
            raise ValueError("a registration reference image needs registration 'phase'")
        radius = int(4.0 * self.blur_sigma + 0.5)  # the blur kernel's half width (reflect padding)
        if self.blur_sigma > 0 and radius >= self.input_size:
            raise ValueError(
                f"blur_sigma ({self.blur_sigma}) is too large for a {self.input_size} px input: "
                f"the blur needs a radius ({radius} px) smaller than the input"
            )
        return self

    @property
    def input_size(self) -> int:
        """Side of the square tensor fed to the backbone."""
        return self.crop_size if self.crop_size is not None else self.image_size

    def remedies(self) -> dict[str, object]:
        """The options for parts that are not aligned that differ from plain PaDiM.

        Returns:
            ``{field: value}`` of every such option not at its default (empty for plain PaDiM).
        """
        fields = ("statistics", "tolerance", *OPTIONAL_IDENTITY_FIELDS)
        changed = {name: getattr(self, name) for name in fields}
        return {name: value for name, value in changed.items() if value != PadimConfig.model_fields[name].default}

    @property
    def plain_scoring(self) -> bool:
        """Whether scoring needs the whole embedding (a remedy for unaligned parts is on)."""
        return self.statistics != "position" or self.tolerance > 0 or self.neighbourhood > 1

    def feature_identity(self) -> dict[str, object]:
        """The fields that must match for two accumulators to be merged or a model to be refit.

        The options of unaligned parts that change the statistics (augmentation, neighbourhood,
        registration) count only when set, so the identity of every earlier model is unchanged.

        Returns:
            The configuration fields that change the embedding of an image.
        """
        identity = self.model_dump(exclude={"eps", "covariance", "blur_sigma", *SCORE_ONLY_FIELDS})
        for name in OPTIONAL_IDENTITY_FIELDS:
            if identity[name] == PadimConfig.model_fields[name].default:
                del identity[name]
        if self.augment_copies == 0:  # the transform's ranges matter only when copies are made
            for name in ("augment_seed", "augment_shift", "augment_rotation", "augment_flip"):
                identity.pop(name, None)
        return identity


SCORE_ONLY_FIELDS = frozenset({"statistics", "tolerance"})
"""Options read only when statistics are finalised or scored (a refit may change them)."""

OPTIONAL_IDENTITY_FIELDS = (
    "augment_copies",
    "augment_seed",
    "augment_shift",
    "augment_rotation",
    "augment_flip",
    "neighbourhood",
    "registration",
    "reference",
)
"""Fields of :meth:`PadimConfig.feature_identity` that appear only when not at their default."""
