"""Every default of a job, defined once.

The model's own options (backbone, channels, image size, crop...) are :class:`padim.core.config.PadimConfig`;
how a job runs is here: :class:`TrainSettings` (fit and calibrate), :class:`ScoreSettings` (a night's
scoring and its drift check), :class:`WatchSettings` (new batches of normal images),
:class:`RunnerSettings` (how many tasks run at once) and the batch size per device
(:data:`CPU_BATCH_SIZE`, :data:`GPU_BATCH_SIZES`). The command line's options, the flows'
parameters, ``padim evaluate``, the demo and the docs read their defaults from these models (a test
checks that ``--help``, the flow signatures and the README agree with them); nothing else states a
default.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "CPU_BATCH_SIZE",
    "GPU_BATCH_SIZES",
    "HEATMAP_ARTIFACTS",
    "HEATMAP_LINK_EXPIRY_S",
    "ComputePath",
    "Device",
    "ExportFormat",
    "GateSettings",
    "Precision",
    "ProposalSettings",
    "RemedyCandidate",
    "RetentionSettings",
    "RunnerSettings",
    "Runtime",
    "ScoreSettings",
    "TrainSettings",
    "WatchSettings",
    "default_of",
]

ComputePath = Literal["auto", "fast", "plain"]
"""Which implementation of fitting and scoring runs: ``"fast"`` (statistics and distances straight from
the stage maps, no upsampled embedding), ``"plain"`` (the whole embedding), or ``"auto"`` (fast on a
CPU, plain on a GPU, where the batched products win). Both give the same numbers (tested)."""

Device = Literal["auto", "cpu", "cuda"]
"""Where the CNN runs: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``; :func:`check_device`
also takes ``"cuda:N"`` for one GPU of several."""

Runtime = Literal["auto", "torch", "openvino"]
"""Where the backbone runs: ``"openvino"`` (CPU only; the same float32 numbers, 2.1x the speed of the
unfolded torch network and 1.2x the folded one on the 2-core AVX2 host of BENCHMARKS.md), ``"torch"``,
or ``"auto"`` (OpenVINO on a CPU when the package is installed, torch otherwise, e.g. on a GPU)."""

Precision = Literal["f32", "bf16"]
"""Arithmetic of the OpenVINO backbone: exact float32, or bfloat16 on CPUs that have it (AVX512-BF16 or
AMX; refused elsewhere, where OpenVINO would silently run float32). Not the default: its accuracy cost
is yet to be measured on such a CPU (BENCHMARKS.md)."""

ExportFormat = Literal["table", "csv", "json", "parquet"]
"""Formats a report query is written in: a text table, CSV, JSON (one array of row objects) or Parquet."""

HEATMAP_LINK_EXPIRY_S = 7 * 24 * 3600
"""Lifetime of the browser links to heat maps in a score run's artifacts (S3 presigned URLs: 7 days,
the longest S3's signature version 4 allows). Links to a local store cannot be opened by a browser,
so its artifacts name the files instead."""

HEATMAP_ARTIFACTS = 5
"""Top anomalies of a score run shown as image artifacts (when the store gives browser links)."""

CPU_BATCH_SIZE = 32
"""Images per batch on a CPU (the network itself runs in micro-batches of 4-8, see the backbones)."""

GPU_BATCH_SIZES: dict[str, int] = {"efficientnet_lite0": 256, "resnet18": 256, "wide_resnet50_2": 96}
"""Images per batch on an 80 GB GPU at 224 x 224; scaled with the free memory and the input area."""


def check_device(value: str) -> str:
    """Validate a device name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if value not in get_args(Device) and not value.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {value!r}")
    return value


class TrainSettings(BaseModel):
    """How to fit and calibrate a product model (besides the model configuration).

    Attributes:
        batch_size: Images per backbone batch; ``None`` picks one for the device (32 on a CPU,
            scaled with free memory on a GPU).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        shard_size: Images per fit task (hundreds to thousands: one task per shard, not per image).
        holdout_fraction: Share of the normal images held out for threshold calibration (then
            merged into the statistics).
        min_holdout: Fewest held-out images.
        calibration_url: A separate folder of normal images for calibration; then every listed
            normal image is fitted and nothing is held out.
        image_fpr: Target false-positive rate of the image threshold on normal images.
        pixel_fpr: Target false-positive rate of the pixel threshold on normal pixels.
        max_skipped_fraction: Largest share of the listed training images that may be skipped
            (unreadable or undecodable files) before training refuses to publish.
        seed: Seed of the held-out split.
        path: Implementation of fitting and scoring (see :data:`ComputePath`).
        runtime: Where the backbone runs (see :data:`Runtime`).
        precision: Arithmetic of the OpenVINO backbone (see :data:`Precision`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int | None = Field(default=None, ge=1, le=4096)
    device: str = "auto"
    shard_size: int = Field(default=1000, ge=1)
    holdout_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    min_holdout: int = Field(default=10, ge=1)
    calibration_url: str | None = None
    image_fpr: float = Field(default=0.01, gt=0.0, lt=1.0)
    pixel_fpr: float = Field(default=0.001, gt=0.0, lt=1.0)
    max_skipped_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    seed: int = 0
    path: ComputePath = "auto"
    runtime: Runtime = "auto"
    precision: Precision = "f32"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)

    @property
    def execution(self) -> dict[str, Any]:
        """How the engine computes: ``path``, ``runtime`` and ``precision``, as keyword arguments of
        :func:`~padim.jobs.engine.fit_images`, :func:`~padim.core.fitter.build_model` and
        :class:`~padim.core.fitter.PadimFitter`."""
        return {"path": self.path, "runtime": self.runtime, "precision": self.precision}


RemedyCandidate = Literal["plain", "neighbourhood3", "augment4", "augment4_any", "shared"]
"""A setting ``padim propose`` chooses from (:data:`padim.evaluation.proposal.CANDIDATE_OVERRIDES`): plain
PaDiM, 3 x 3 locally aware features, 4 augmented copies per image (up to 15 degrees, or any angle), or one
Gaussian shared by all positions."""


class ProposalSettings(BaseModel):
    """How ``padim propose`` chooses a product's setting from its normal images alone.

    Attributes:
        candidates: The settings tried, in order of preference on a tie.
        defects_per_image: Synthetic defective copies of each held-out normal image.
        tie_tolerance: Probe-AUROC lead that counts as a tie (the earlier candidate keeps its place).
        confidence: Share of the bootstrap rounds in which the best candidate must lead an earlier
            one by more than ``tie_tolerance`` to be chosen over it.
        bootstrap_rounds: Paired bootstrap rounds over the held-out images.
        seed: Seed of the synthetic defects and of the bootstrap.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: tuple[RemedyCandidate, ...] = get_args(RemedyCandidate)
    defects_per_image: int = Field(default=4, ge=1, le=16)
    tie_tolerance: float = Field(default=0.002, ge=0.0, lt=0.5)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    bootstrap_rounds: int = Field(default=1000, ge=100, le=100_000)
    seed: int = 0

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("candidates must name at least one setting")
        if len(set(value)) != len(value):
            raise ValueError(f"candidates must not repeat a setting, got {list(value)}")
        return value


class ScoreSettings(BaseModel):
    """How a score run works.

    Attributes:
        batch_size: Images per backbone batch; ``None`` picks one for the device.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        shard_size: Images per score task.
        heatmaps: Write a heat-map PNG for every anomalous image.
        drift_max_anomaly_rate: Share of anomalous images above which the night counts as
            drifted; ``None`` = ``max(5 x the calibrated image FPR, 0.1)`` (with tens of held-out
            images the realised false-positive rate scatters around its target by a few percent).
        drift_max_median_ratio: Tonight's median score over the calibration median above which
            the bulk of the scores counts as drifted.
        drift_min_images: Fewest scored images for a drift decision.
        path: Implementation of scoring (see :data:`ComputePath`).
        runtime: Where the backbone runs (see :data:`Runtime`).
        precision: Arithmetic of the OpenVINO backbone (see :data:`Precision`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int | None = Field(default=None, ge=1, le=4096)
    device: str = "auto"
    shard_size: int = Field(default=500, ge=1)
    heatmaps: bool = True
    drift_max_anomaly_rate: float | None = Field(default=None, gt=0.0, le=1.0)
    drift_max_median_ratio: float = Field(default=1.5, gt=1.0)
    drift_min_images: int = Field(default=20, ge=1)
    path: ComputePath = "auto"
    runtime: Runtime = "auto"
    precision: Precision = "f32"

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)


class WatchSettings(BaseModel):
    """How the watch flow decides that a batch of new normal images has fully arrived.

    Attributes:
        settle_seconds: A landing batch must be unchanged this long before it is announced.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    settle_seconds: float = Field(default=60.0, ge=0.0)


class GateSettings(BaseModel):
    """When a retrained model version may replace the one in use (the promotion gate).

    A retrain publishes its version as a *candidate*; it becomes the version in use only if every
    check passes on the product's calibration pool (the held-out normal images of every training
    batch so far) and its reference defects.

    Attributes:
        max_threshold_change: Largest relative move of the image threshold against the version in
            use (``|new - old| / old``).
        fpr_tolerance: The candidate's false-alarm rate on the calibration pool (counted out of
            sample, :func:`padim.jobs.calibration_pool.score_pool`) may exceed the rate its threshold can
            resolve, ``max(target image FPR, 1 / (n + 1))`` for a threshold set on ``n`` held-out
            images, by at most this much.
        min_pool_images: Fewest readable pool images for the false-alarm check; with fewer, the
            check is skipped (and the run says so).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_threshold_change: float = Field(default=0.2, gt=0.0)
    fpr_tolerance: float = Field(default=0.05, ge=0.0, lt=1.0)
    min_pool_images: int = Field(default=10, ge=1)


class RetentionSettings(BaseModel):
    """How many model versions a product keeps.

    Attributes:
        keep_versions: Versions kept after each publish (newest first); older ones are removed,
            except the version in use and candidates, which are never removed. ``None`` keeps all.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_versions: int | None = Field(default=10, ge=1)


class RunnerSettings(BaseModel):
    """How many tasks of a flow run at once.

    Attributes:
        task_threads: Threads of the default task runner (``PADIM_TASK_THREADS``). Each score or
            fit task runs the network with torch's own intra-op threads, so more task threads than
            cores only helps while tasks wait for storage.
        dask_workers: Worker processes of a local Dask cluster (``PADIM_DASK_WORKERS``).
        model_cache: Loaded model versions a process keeps (least recently used first out).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_threads: int = Field(default=2, ge=1)
    dask_workers: int = Field(default=2, ge=1)
    model_cache: int = Field(default=2, ge=1)


def default_of(model: type[BaseModel], name: str) -> Any:
    """The default value of one field of a settings model.

    Args:
        model: A settings model class (``TrainSettings``, ``ScoreSettings``, ``PadimConfig``...).
        name: The field.

    Returns:
        Its default.

    Raises:
        KeyError: If the model has no such field.
    """
    return model.model_fields[name].default
