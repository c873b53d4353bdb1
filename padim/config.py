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
        backbone: Name of the feature extractor (see :mod:`padim.backbones`).
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

    @model_validator(mode="after")
    def _check_crop(self) -> PadimConfig:
        if self.crop_size is not None and self.crop_size > self.image_size:
            raise ValueError(f"crop_size ({self.crop_size}) cannot exceed image_size ({self.image_size})")
        if self.resize_mode == "shorter_side" and self.crop_size is None:
            raise ValueError("resize_mode 'shorter_side' needs a crop_size so that every image has the same shape")
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

    def feature_identity(self) -> dict[str, object]:
        """The fields that must match for two accumulators to be merged or a model to be refit.

        Returns:
            The configuration fields that change the embedding of an image.
        """
        return self.model_dump(exclude={"eps", "covariance", "blur_sigma"})
