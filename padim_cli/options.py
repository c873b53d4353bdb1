"""The command line's choices and the options several commands share, each defined once.

The choices are Enums built from the settings' ``Literal`` types (:mod:`padim.settings`,
:mod:`padim.core.config`), so a new runtime, device or backbone there is a new CLI choice without a
second list here. The options' defaults are the settings' too: the commands give them with
:func:`padim.settings.default_of`. Nothing heavy is imported, so ``padim --help`` answers at once.
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any, get_args

import typer

from padim import settings
from padim.core import config
from padim.core.config import DEFAULT_CHANNELS, PadimConfig
from padim.settings import CPU_BATCH_SIZE, GateSettings, RunnerSettings, TrainSettings, default_of

__all__ = [
    "CONTEXT_SETTINGS",
    "PRODUCT_HELP",
    "AugmentCopiesOpt",
    "AugmentFlipOpt",
    "AugmentRotationOpt",
    "AugmentSeedOpt",
    "AugmentShiftOpt",
    "Backbone",
    "BackboneOpt",
    "BatchOpt",
    "ChannelsOpt",
    "CropOpt",
    "DaskOpt",
    "DaskWorkersOpt",
    "Device",
    "DeviceOpt",
    "DriftMaxRateOpt",
    "DriftMaxRatioOpt",
    "DriftMinImagesOpt",
    "FitShardOpt",
    "HoldoutOpt",
    "ImageFprOpt",
    "ImageSizeOpt",
    "JsonOpt",
    "ListFormat",
    "NeighbourhoodOpt",
    "NoCropOpt",
    "PixelFprOpt",
    "PrecisionChoice",
    "PrecisionOpt",
    "ProductFilterOpt",
    "ProductOpt",
    "ReferenceOpt",
    "RegistrationChoice",
    "RegistrationOpt",
    "ReportFormat",
    "RuntimeChoice",
    "RuntimeOpt",
    "StatisticsChoice",
    "StatisticsOpt",
    "StoreOpt",
    "ToleranceOpt",
    "WeightsOpt",
    "choice_enum",
    "remedy_options",
]

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
"""Click settings of the app and its sub-apps: ``-h`` as ``--help``, help text up to 110 columns."""

PRODUCT_HELP = "Product name: 1-64 lower-case letters, digits, '.', '_' or '-' (e.g. bottle, tile-2)."
"""Help of every ``--product`` option that names one product to work on."""


def choice_enum(name: str, choices: Any, doc: str) -> type[Enum]:
    """A ``str`` Enum whose members are the values of a ``Literal`` (member name = value).

    Args:
        name: The Enum's class name.
        choices: A ``Literal[...]`` type of the settings.
        doc: The Enum's docstring.

    Returns:
        The Enum class, one member per value in the Literal's order.
    """
    enum = Enum(name, [(value, value) for value in get_args(choices)], type=str, module=__name__)  # type: ignore[misc]
    enum.__doc__ = doc
    return enum


Backbone = choice_enum("Backbone", config.BackboneName, "Feature extractors.")
Device = choice_enum("Device", settings.Device, "Compute devices.")
RuntimeChoice = choice_enum("RuntimeChoice", settings.Runtime, "Where the backbone runs.")
PrecisionChoice = choice_enum("PrecisionChoice", settings.Precision, "Arithmetic of the OpenVINO backbone.")
StatisticsChoice = choice_enum(
    "StatisticsChoice", config.StatisticsMode, "Gaussians of the model (see :class:`padim.core.config.PadimConfig`)."
)
RegistrationChoice = choice_enum(
    "RegistrationChoice", config.Registration, "Registration of each image onto the product's reference."
)
ReportFormat = choice_enum("ReportFormat", settings.ExportFormat, "Output formats of ``padim report``.")


class ListFormat(str, Enum):
    """Output formats of ``padim models`` (the CLI's own: a table, or JSON for scripts)."""

    table = "table"
    json = "json"


StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store",
        metavar="URL",
        help="Store root: a local folder or s3://bucket/prefix. Default: $PADIM_STORE, else ./padim-store.",
        show_default=False,
    ),
]
ProductOpt = Annotated[
    str,
    typer.Option(
        "--product",
        "-p",
        metavar="NAME",
        help=PRODUCT_HELP,
    ),
]
ProductFilterOpt = Annotated[
    str | None, typer.Option("--product", "-p", metavar="NAME", help="Only this product.", show_default=False)
]
DeviceOpt = Annotated[
    Device, typer.Option("--device", help="Where the CNN runs; auto picks CUDA when present.", case_sensitive=False)
]
RuntimeOpt = Annotated[
    RuntimeChoice,
    typer.Option(
        "--runtime",
        help="Where the CNN runs: auto uses OpenVINO on a CPU when installed (same float32 numbers, about 3x"
        " faster) and torch elsewhere; torch or openvino force one.",
        case_sensitive=False,
    ),
]
PrecisionOpt = Annotated[
    PrecisionChoice,
    typer.Option(
        "--precision",
        help="Arithmetic of the OpenVINO CNN: f32 (exact) or bf16 (faster on CPUs that have it; see BENCHMARKS.md).",
        case_sensitive=False,
    ),
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        min=1,
        max=4096,
        metavar="N",
        help=f"Images per CNN batch. Default: {CPU_BATCH_SIZE} on a CPU; on a GPU, sized to its free memory.",
        show_default=False,
    ),
]
BackboneOpt = Annotated[Backbone, typer.Option("--backbone", help="Feature extractor.")]
WeightsOpt = Annotated[
    str | None, typer.Option("--weights", metavar="URL", help="Backbone weights file.", show_default=False)
]
ChannelsOpt = Annotated[
    int | None,
    typer.Option(
        "--channels",
        min=1,
        metavar="D",
        help="Embedding channels kept. Default: the backbone's, "
        + ", ".join(f"{d} for {name}" for name, d in DEFAULT_CHANNELS.items())
        + ".",
        show_default=False,
    ),
]
ImageSizeOpt = Annotated[
    int, typer.Option("--image-size", min=32, max=2048, metavar="N", help="Side the images are resized to.")
]
CropOpt = Annotated[
    int | None,
    typer.Option(
        "--crop",
        min=32,
        max=2048,
        metavar="N",
        help=(
            "Centre-crop side after resizing. Default: no crop, the whole image is inspected"
            " (the PaDiM paper uses --image-size 256 --crop 224)."
        ),
        show_default=False,
    ),
]
NoCropOpt = Annotated[bool, typer.Option("--no-crop", help="Use the whole resized image (the default).")]
FitShardOpt = Annotated[int, typer.Option("--shard-size", min=1, help="Images per fit task.")]
# Remedies for parts that are not aligned (PadimConfig documents each; the defaults are plain PaDiM).
StatisticsOpt = Annotated[
    StatisticsChoice,
    typer.Option(
        "--statistics",
        help="Gaussians: one per patch position (PaDiM), one shared by all positions (parts that move), or both"
        " (a patch's distance is the smaller).",
        case_sensitive=False,
    ),
]
AugmentCopiesOpt = Annotated[
    int,
    typer.Option(
        "--augment-copies",
        min=0,
        max=64,
        metavar="N",
        help="Also fit N randomly shifted/rotated copies of each good image (0 = off).",
    ),
]
AugmentSeedOpt = Annotated[int, typer.Option("--augment-seed", help="Seed of the copies' random transforms.")]
AugmentShiftOpt = Annotated[
    float,
    typer.Option("--augment-shift", min=0.0, max=0.5, help="Largest shift of a copy, as a share of the side."),
]
AugmentRotationOpt = Annotated[
    float,
    typer.Option("--augment-rotation", min=0.0, max=180.0, help="Largest rotation of a copy, in degrees."),
]
AugmentFlipOpt = Annotated[
    bool,
    typer.Option(
        "--augment-flip",
        help=f"Also flip the copies at random.  [default: {str(default_of(PadimConfig, 'augment_flip')).lower()}]",
    ),
]
NeighbourhoodOpt = Annotated[
    int,
    typer.Option(
        "--neighbourhood",
        min=1,
        max=15,
        metavar="K",
        help="Average each patch's features over its K x K neighbourhood (odd; 1 = off, 3 as PatchCore).",
    ),
]
ToleranceOpt = Annotated[
    int,
    typer.Option(
        "--tolerance",
        min=0,
        max=8,
        metavar="R",
        help="Score each patch against the Gaussians of the positions within R patches (0 = PaDiM).",
    ),
]
RegistrationOpt = Annotated[
    RegistrationChoice,
    typer.Option(
        "--registration",
        help="Translate each image onto the product's reference image (phase correlation) before the CNN.",
        case_sensitive=False,
    ),
]
ReferenceOpt = Annotated[
    str | None,
    typer.Option(
        "--reference",
        metavar="URL",
        help="Reference image of --registration phase. Default: the first training image.",
        show_default=False,
    ),
]


def remedy_options(
    statistics: StatisticsChoice,
    augment_copies: int,
    augment_seed: int,
    augment_shift: float,
    augment_rotation: float,
    augment_flip: bool,
    neighbourhood: int,
    tolerance: int,
    registration: RegistrationChoice,
    reference: str | None,
) -> dict[str, object]:
    """The options for parts that are not aligned, as :class:`PadimConfig` fields."""
    return {
        "statistics": statistics.value,
        "augment_copies": augment_copies,
        "augment_seed": augment_seed,
        "augment_shift": augment_shift,
        "augment_rotation": augment_rotation,
        "augment_flip": augment_flip,
        "neighbourhood": neighbourhood,
        "tolerance": tolerance,
        "registration": registration.value,
        "reference": reference,
    }


HoldoutOpt = Annotated[
    float,
    typer.Option(
        "--holdout-fraction",
        min=0.0,
        max=0.9,
        help="Share of the good images held out for calibration "
        f"(at least {default_of(TrainSettings, 'min_holdout')} images).",
    ),
]
ImageFprOpt = Annotated[
    float, typer.Option("--image-fpr", min=0.0, max=1.0, help="Target false-positive rate of the image threshold.")
]
PixelFprOpt = Annotated[
    float, typer.Option("--pixel-fpr", min=0.0, max=1.0, help="Target false-positive rate of the pixel threshold.")
]
DaskOpt = Annotated[
    str | None,
    typer.Option(
        "--dask",
        metavar="ADDRESS|local",
        help="Run the tasks on Dask: a scheduler address (tcp://host:8786) or 'local' for a local cluster.",
        show_default=False,
    ),
]
DaskWorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--dask-workers",
        min=1,
        help=f"Worker processes of a local Dask cluster (default {default_of(RunnerSettings, 'dask_workers')}).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the full result as JSON instead of the summary.")]
DriftMinImagesOpt = Annotated[
    int,
    typer.Option("--drift-min-images", min=1, metavar="N", help="Fewest scored images for a drift decision."),
]
DriftMaxRateOpt = Annotated[
    float | None,
    typer.Option(
        "--drift-max-anomaly-rate",
        min=0.0,
        max=1.0,
        metavar="RATE",
        help="Share of anomalous images above which a night drifted. Default: max(5 x the model's image FPR, 10 %).",
        show_default=False,
    ),
]
DriftMaxRatioOpt = Annotated[
    float,
    typer.Option(
        "--drift-max-median-ratio",
        min=1.0,
        metavar="RATIO",
        help="Tonight's median score over the held-out images' median above which a night drifted.",
    ),
]


# Bounds of the promotion gate (`padim configure` stores them per product; `padim retrain` overrides them).
MaxThresholdChangeOpt = Annotated[
    float | None,
    typer.Option(
        "--max-threshold-change",
        min=0.0,
        metavar="FRACTION",
        help="Promotion gate: largest relative move of the image threshold. Default: the product's setting, else "
        f"{default_of(GateSettings, 'max_threshold_change')}.",
        show_default=False,
    ),
]
FprToleranceOpt = Annotated[
    float | None,
    typer.Option(
        "--fpr-tolerance",
        min=0.0,
        max=1.0,
        metavar="FRACTION",
        help="Promotion gate: false alarms on the calibration pool may exceed max(target FPR, 1 / (n + 1)), n the "
        "held-out images of its calibration, by this much. Default: the product's setting, else "
        f"{default_of(GateSettings, 'fpr_tolerance')}.",
        show_default=False,
    ),
]
