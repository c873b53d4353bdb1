"""The ``padim`` command line (typer).

Every command prints a readable summary and exits 0 on success; a user error (wrong path, unknown
product, invalid option value, corrupt model) prints one line ``error: <reason>`` on standard error
and exits 1, without a traceback unless ``--debug`` (or ``PADIM_DEBUG=1``) is given. Torch and
Prefect are imported inside the commands, so ``padim --help`` answers at once.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from padim.config import DEFAULT_CHANNELS, PadimConfig
from padim.settings import (
    CPU_BATCH_SIZE,
    GateSettings,
    RetentionSettings,
    RunnerSettings,
    ScoreSettings,
    TrainSettings,
    WatchSettings,
    default_of,
)
from padim_cli.environment import apply_defaults, debug_enabled
from padim_cli.errors import describe_error, exit_code_for
from padim_cli.render import (
    MODEL_HEADERS,
    format_table,
    model_rows,
    print_json,
    score_lines,
    train_lines,
)
from padim_cli.runner import (
    absolute_url,
    check_backbone,
    check_folder,
    check_model,
    check_product,
    check_store_exists,
    iso_day,
    resolve_store,
    run_flow,
)

__all__ = ["app", "main"]


class Backbone(str, Enum):
    """Feature extractors."""

    efficientnet_lite0 = "efficientnet_lite0"
    resnet18 = "resnet18"
    wide_resnet50_2 = "wide_resnet50_2"


class Device(str, Enum):
    """Compute devices."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class RuntimeChoice(str, Enum):
    """Where the backbone runs."""

    auto = "auto"
    torch = "torch"
    openvino = "openvino"


class PrecisionChoice(str, Enum):
    """Arithmetic of the OpenVINO backbone."""

    f32 = "f32"
    bf16 = "bf16"


class StatisticsChoice(str, Enum):
    """Gaussians of the model (see :class:`padim.config.PadimConfig`)."""

    position = "position"
    shared = "shared"
    both = "both"


class RegistrationChoice(str, Enum):
    """Registration of each image onto the product's reference."""

    none = "none"
    phase = "phase"


class ReportFormat(str, Enum):
    """Output formats of ``padim report``."""

    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


class ListFormat(str, Enum):
    """Output formats of ``padim models``."""

    table = "table"
    json = "json"


HELP = """
Visual inspection with PaDiM: learn what good parts look like from images of good parts only,
score every new production image, localise defects with heat maps and write Parquet reports.

Start with `padim demo` (synthetic data, nothing to download, 1-2 minutes). A product's
models and reports live in a store: a local folder or an `s3://bucket/prefix`, given by `--store`,
else `$PADIM_STORE`, else `./padim-store`. `--verbose` and `--debug` may also follow the command.
"""

app = typer.Typer(
    name="padim",
    help=HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)

# ---- shared options -------------------------------------------------------------------------

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
        help="Product name: 1-64 lower-case letters, digits, '.', '_' or '-' (e.g. bottle, tile-2).",
    ),
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


# ---- global options -------------------------------------------------------------------------


@app.callback()
def configure_run(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's flow and task logs.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors (or PADIM_DEBUG=1).")] = False,
) -> None:
    """Global options, applied before any command imports Prefect."""
    apply_defaults(verbose=verbose, debug=debug)


# ---- demo -----------------------------------------------------------------------------------


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option("--workdir", metavar="DIR", help="Working folder for the data set (and the store).")
    ] = Path("demo-work"),
    store: Annotated[
        str | None,
        typer.Option("--store", metavar="URL", help="Store root. Default: DIR/store.", show_default=False),
    ] = None,
    product: Annotated[str, typer.Option("--product", "-p", metavar="NAME", help="Product name.")] = "metal-plate",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic data set.")] = 0,
    device: DeviceOpt = Device(default_of(TrainSettings, "device")),
    runtime: RuntimeOpt = RuntimeChoice(default_of(TrainSettings, "runtime")),
    precision: PrecisionOpt = PrecisionChoice(default_of(TrainSettings, "precision")),
) -> None:
    """Run the whole job end to end on a synthetic product: nothing to download.

    Makes a small data set of a brushed-metal surface (60 normal images to train on and a "night"
    of 24 new images, 15 of them with scratches, spots or cracks, with their masks) in DIR,
    trains the product's model with the default backbone (EfficientNet-Lite0, ImageNet weights
    shipped with the package) through the train flow, scores the night through the score flow
    (Parquet report and heat maps of the anomalous images), then prints the top anomalies, where
    the heat maps and the report are, and the image AUROC against the known labels. Takes 1-2
    minutes on 2 CPU cores.

    Examples:

    \b
        padim demo
        padim demo --workdir /tmp/padim-demo --device cpu
    """
    from padim_cli.demo import run_demo

    run_demo(workdir, store, product, seed=seed, device=device.value, runtime=runtime.value, precision=precision.value)


# ---- train ----------------------------------------------------------------------------------


@app.command()
def train(
    product: ProductOpt,
    normal: Annotated[
        str,
        typer.Option(
            "--normal", metavar="URL", help="Folder (local or s3://) of images of good parts, searched recursively."
        ),
    ],
    store: StoreOpt = None,
    backbone: Annotated[
        Backbone, typer.Option("--backbone", help="Feature extractor (CNN pretrained on ImageNet).")
    ] = Backbone(default_of(PadimConfig, "backbone")),
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            metavar="URL",
            help="Backbone weights file (path or s3://), e.g. resnet18-f37072fd.pth. Default: the packaged "
            "EfficientNet-Lite0 weights, or torchvision's cache for ResNets.",
            show_default=False,
        ),
    ] = None,
    channels: ChannelsOpt = None,
    image_size: ImageSizeOpt = default_of(PadimConfig, "image_size"),
    crop: CropOpt = default_of(PadimConfig, "crop_size"),
    no_crop: NoCropOpt = False,
    batch_size: BatchOpt = default_of(TrainSettings, "batch_size"),
    device: DeviceOpt = Device(default_of(TrainSettings, "device")),
    runtime: RuntimeOpt = RuntimeChoice(default_of(TrainSettings, "runtime")),
    precision: PrecisionOpt = PrecisionChoice(default_of(TrainSettings, "precision")),
    calibration: Annotated[
        str | None,
        typer.Option(
            "--calibration",
            metavar="URL",
            help="Separate folder of good images to calibrate the thresholds on. Default: hold a share of "
            "--normal out (--holdout-fraction).",
            show_default=False,
        ),
    ] = None,
    holdout_fraction: HoldoutOpt = default_of(TrainSettings, "holdout_fraction"),
    image_fpr: ImageFprOpt = default_of(TrainSettings, "image_fpr"),
    pixel_fpr: PixelFprOpt = default_of(TrainSettings, "pixel_fpr"),
    max_skipped_fraction: Annotated[
        float,
        typer.Option(
            "--max-skipped-fraction",
            min=0.0,
            max=1.0,
            help="Largest share of unreadable training images before nothing is published.",
        ),
    ] = default_of(TrainSettings, "max_skipped_fraction"),
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per fit task.")] = default_of(
        TrainSettings, "shard_size"
    ),
    statistics: StatisticsOpt = StatisticsChoice(default_of(PadimConfig, "statistics")),
    augment_copies: AugmentCopiesOpt = default_of(PadimConfig, "augment_copies"),
    augment_seed: AugmentSeedOpt = default_of(PadimConfig, "augment_seed"),
    augment_shift: AugmentShiftOpt = default_of(PadimConfig, "augment_shift"),
    augment_rotation: AugmentRotationOpt = default_of(PadimConfig, "augment_rotation"),
    augment_flip: AugmentFlipOpt = default_of(PadimConfig, "augment_flip"),
    neighbourhood: NeighbourhoodOpt = default_of(PadimConfig, "neighbourhood"),
    tolerance: ToleranceOpt = default_of(PadimConfig, "tolerance"),
    registration: RegistrationOpt = RegistrationChoice(default_of(PadimConfig, "registration")),
    reference: ReferenceOpt = default_of(PadimConfig, "reference"),
    dask: DaskOpt = None,
    dask_workers: DaskWorkersOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a product's model on images of good parts and publish it as a new version.

    Runs the train flow: lists the images, fits the per-patch Gaussian statistics in shards,
    calibrates the decision thresholds on held-out good images (no defect labels needed),
    publishes a new model version in the store and makes it the product's latest. Prints the new
    version.

    Examples:

    \b
        padim train --product bottle --normal ./images/bottle/good
        padim train -p bottle --normal s3://factory/bottle/good --store s3://padim/store
        padim train -p bottle --normal ./good --backbone resnet18 --weights ./resnet18-f37072fd.pth
        padim train -p gear --normal ./gear/good --statistics both --tolerance 1
    """
    from flows.params import build_config

    check_product(product)
    if no_crop and crop is not None:
        raise typer.BadParameter("give either --crop N or --no-crop, not both", param_hint="--crop")
    remedies = remedy_options(
        statistics,
        augment_copies,
        augment_seed,
        augment_shift,
        augment_rotation,
        augment_flip,
        neighbourhood,
        tolerance,
        registration,
        reference,
    )
    build_config(backbone.value, weights, channels, image_size, crop, **remedies)
    root = resolve_store(store)
    normal = check_folder(absolute_url(normal, "normal images folder"), "normal images", root)
    if calibration:
        calibration = check_folder(absolute_url(calibration, "calibration images folder"), "calibration images", root)
    check_backbone(backbone.value, weights, device.value, runtime.value, precision.value)
    result = run_flow(
        "train",
        dask=dask,
        dask_workers=dask_workers,
        product=product,
        normal_url=normal,
        store=root,
        backbone=backbone.value,
        weights=weights,
        channels=channels,
        image_size=image_size,
        crop_size=crop,
        batch_size=batch_size,
        device=device.value,
        runtime=runtime.value,
        precision=precision.value,
        shard_size=shard_size,
        holdout_fraction=holdout_fraction,
        calibration_url=calibration,
        image_fpr=image_fpr,
        pixel_fpr=pixel_fpr,
        max_skipped_fraction=max_skipped_fraction,
        **remedies,
    )
    if as_json:
        print_json(result)
    else:
        print("\n".join(train_lines(result)))


# ---- score ----------------------------------------------------------------------------------


@app.command()
def score(
    product: ProductOpt,
    images: Annotated[
        str,
        typer.Option("--images", metavar="URL", help="Folder (local or s3://) of the new production images."),
    ],
    store: StoreOpt = None,
    date: Annotated[
        datetime | None,
        typer.Option(
            "--date",
            formats=["%Y-%m-%d"],
            metavar="YYYY-MM-DD",
            help="Production date (the report partition). Default: today (UTC).",
            show_default=False,
        ),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            "--version", metavar="V", help="Model version to score with. Default: the latest.", show_default=False
        ),
    ] = None,
    batch_size: BatchOpt = default_of(ScoreSettings, "batch_size"),
    device: DeviceOpt = Device(default_of(ScoreSettings, "device")),
    runtime: RuntimeOpt = RuntimeChoice(default_of(ScoreSettings, "runtime")),
    precision: PrecisionOpt = PrecisionChoice(default_of(ScoreSettings, "precision")),
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per score task.")] = default_of(
        ScoreSettings, "shard_size"
    ),
    no_heatmaps: Annotated[
        bool, typer.Option("--no-heatmaps", help="Do not write heat maps of anomalous images.")
    ] = False,
    dask: DaskOpt = None,
    dask_workers: DaskWorkersOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a folder of production images into the product's Parquet report.

    Runs the score flow (the nightly job): every image becomes one report row (unreadable files
    too, with the reason), anomalous images get a heat map, and images this model version already
    scored that night with the same content are skipped, so a re-run adds nothing (a file rewritten
    under the same name is scored again). If storage cannot deliver some images, the others are
    scored and the command fails naming them; run it again to score the rest. Prints how many
    images were scored, skipped, found anomalous and unreadable, and the top anomalies.

    Examples:

    \b
        padim score --product bottle --images ./incoming/2026-11-25 --date 2026-11-25
        padim score -p bottle --images s3://factory/bottle/incoming/2026-11-25 --store s3://padim/store
    """
    check_product(product)
    root = resolve_store(store)
    images = check_folder(absolute_url(images, "production images folder"), "production images", root)
    check_model(root, product, version)
    result = run_flow(
        "score",
        dask=dask,
        dask_workers=dask_workers,
        product=product,
        images_url=images,
        store=root,
        date=iso_day(date.date() if date else None),
        version=version,
        batch_size=batch_size,
        device=device.value,
        runtime=runtime.value,
        precision=precision.value,
        shard_size=shard_size,
        heatmaps=not no_heatmaps,
    )
    if as_json:
        print_json(result)
        return
    from padim.reports.layout import partition_url

    day = datetime.strptime(result["date"], "%Y-%m-%d").date()
    print("\n".join(score_lines(result, partition_url(root, product, day))))


# ---- evaluate -------------------------------------------------------------------------------


@app.command()
def evaluate(
    dataset_dir: Annotated[
        str,
        typer.Argument(metavar="DATASET_DIR", help="Data set in MVTec AD layout (train/good, test/*, ground_truth/*)."),
    ],
    backbone: Annotated[Backbone, typer.Option("--backbone", help="Feature extractor.")] = Backbone(
        default_of(PadimConfig, "backbone")
    ),
    weights: Annotated[
        str | None, typer.Option("--weights", metavar="URL", help="Backbone weights file.", show_default=False)
    ] = None,
    channels: ChannelsOpt = None,
    image_size: ImageSizeOpt = default_of(PadimConfig, "image_size"),
    crop: CropOpt = default_of(PadimConfig, "crop_size"),
    no_crop: NoCropOpt = False,
    batch_size: BatchOpt = default_of(TrainSettings, "batch_size"),
    device: DeviceOpt = Device(default_of(TrainSettings, "device")),
    runtime: RuntimeOpt = RuntimeChoice(default_of(TrainSettings, "runtime")),
    precision: PrecisionOpt = PrecisionChoice(default_of(TrainSettings, "precision")),
    holdout_fraction: HoldoutOpt = default_of(TrainSettings, "holdout_fraction"),
    image_fpr: ImageFprOpt = default_of(TrainSettings, "image_fpr"),
    pixel_fpr: PixelFprOpt = default_of(TrainSettings, "pixel_fpr"),
    json_file: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Also write the metrics as JSON.", show_default=False)
    ] = None,
    figures: Annotated[
        Path | None,
        typer.Option(
            "--figures",
            metavar="DIR",
            help="Write a figure per test image: image, true mask, heat map, predicted mask.",
            show_default=False,
        ),
    ] = None,
    roc: Annotated[
        bool, typer.Option("--roc", help="Also draw the image and pixel ROC curves (needs --figures).")
    ] = False,
    statistics: StatisticsOpt = StatisticsChoice(default_of(PadimConfig, "statistics")),
    augment_copies: AugmentCopiesOpt = default_of(PadimConfig, "augment_copies"),
    augment_seed: AugmentSeedOpt = default_of(PadimConfig, "augment_seed"),
    augment_shift: AugmentShiftOpt = default_of(PadimConfig, "augment_shift"),
    augment_rotation: AugmentRotationOpt = default_of(PadimConfig, "augment_rotation"),
    augment_flip: AugmentFlipOpt = default_of(PadimConfig, "augment_flip"),
    neighbourhood: NeighbourhoodOpt = default_of(PadimConfig, "neighbourhood"),
    tolerance: ToleranceOpt = default_of(PadimConfig, "tolerance"),
    registration: RegistrationOpt = RegistrationChoice(default_of(PadimConfig, "registration")),
    reference: ReferenceOpt = default_of(PadimConfig, "reference"),
) -> None:
    """Measure accuracy on a labelled data set in the MVTec AD layout (no Prefect, no store).

    Fits on train/good (holding some images out to calibrate the thresholds, as training does),
    scores every test image and prints image AUROC, pixel AUROC, AUPRO, the AUROC of each defect
    kind, the precision and recall of the label-free calibrated threshold, and the speed.

    Examples:

    \b
        padim evaluate ./datasets/mvtec_bottle
        padim evaluate ./datasets/mvtec_bottle --backbone resnet18 --weights ./resnet18-f37072fd.pth
        padim evaluate ./demo-work/data --json metrics.json --figures ./figures --roc
    """
    from flows.params import build_config

    if roc and figures is None:
        raise typer.BadParameter("--roc needs --figures DIR (the curves are drawn there)", param_hint="--roc")
    if no_crop and crop is not None:
        raise typer.BadParameter("give either --crop N or --no-crop, not both", param_hint="--crop")
    remedies = remedy_options(
        statistics,
        augment_copies,
        augment_seed,
        augment_shift,
        augment_rotation,
        augment_flip,
        neighbourhood,
        tolerance,
        registration,
        reference,
    )
    config = build_config(backbone.value, weights, channels, image_size, crop, **remedies)
    settings = TrainSettings(
        batch_size=batch_size,
        device=device.value,
        runtime=runtime.value,
        precision=precision.value,
        holdout_fraction=holdout_fraction,
        image_fpr=image_fpr,
        pixel_fpr=pixel_fpr,
    )
    from padim_cli.evaluate import run_evaluation

    run_evaluation(dataset_dir, config, settings, json_file=json_file, figures=figures, roc=roc)


# ---- report ---------------------------------------------------------------------------------


@app.command()
def report(
    store: StoreOpt = None,
    product: Annotated[
        str | None, typer.Option("--product", "-p", metavar="NAME", help="Only this product.", show_default=False)
    ] = None,
    since: Annotated[
        datetime | None,
        typer.Option(
            "--since", formats=["%Y-%m-%d"], metavar="YYYY-MM-DD", help="First date, inclusive.", show_default=False
        ),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option(
            "--until", formats=["%Y-%m-%d"], metavar="YYYY-MM-DD", help="Last date, inclusive.", show_default=False
        ),
    ] = None,
    min_score: Annotated[
        float | None,
        typer.Option("--min-score", metavar="X", help="Only rows whose raw score is at least X.", show_default=False),
    ] = None,
    anomalies: Annotated[bool, typer.Option("--anomalies", help="Only anomalous images.")] = False,
    top: Annotated[
        int | None,
        typer.Option(
            "--top", min=1, metavar="N", help="The N highest-scoring rows, highest first.", show_default=False
        ),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", metavar="V", help="Only rows scored by this model version.", show_default=False),
    ] = None,
    summary: Annotated[
        bool,
        typer.Option(
            "--summary", help="One row per product and day: images, anomalies, rate, errors, score percentiles."
        ),
    ] = False,
    output_format: Annotated[
        ReportFormat, typer.Option("--format", "-f", help="Output format.", case_sensitive=False)
    ] = ReportFormat.table,
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write to a file (or s3:// URL) instead of the terminal.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Query the Parquet score reports: filter rows, top anomalies, daily summaries.

    Reads `<store>/reports/` (hive-partitioned by product and date, local or S3), keeps one row
    per image and model version, and prints a table, CSV, JSON (one array of row objects keyed by
    the report's column names) or writes Parquet. The table shows the main columns; CSV, JSON and
    Parquet have every column.

    Examples:

    \b
        padim report --product bottle --since 2026-11-01 --anomalies
        padim report --top 20 --format csv --output top20.csv
        padim report --summary --format json
        padim report --store s3://padim/store --min-score 50 --format parquet --output high.parquet
    """
    from padim.reports import daily_summary, export, query_reports

    if summary and (anomalies or top is not None or min_score is not None):
        raise typer.BadParameter(
            "--summary cannot be combined with --anomalies, --top or --min-score", param_hint="--summary"
        )
    if output_format is ReportFormat.parquet and not output:
        raise typer.BadParameter("--format parquet needs --output FILE", param_hint="--format")
    root = check_store_exists(resolve_store(store))
    if product is not None:
        check_product(product)
    window = {
        "product": product,
        "since": iso_day(since.date() if since else None),
        "until": iso_day(until.date() if until else None),
        "model_version": version,
    }
    if summary:
        frame = daily_summary(root, **window)
    else:
        frame = query_reports(root, **window, min_score=min_score, anomalies_only=anomalies, top=top)
    text = export(frame, output_format.value, output)  # type: ignore[arg-type]
    if text is not None:
        sys.stdout.write(text)
    else:
        print(f"Wrote {len(frame)} rows to {output}", file=sys.stderr)


# ---- models ---------------------------------------------------------------------------------


models_app = typer.Typer(
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
app.add_typer(models_app, name="models")


@models_app.callback(invoke_without_command=True)
def models(
    ctx: typer.Context,
    product: Annotated[
        str | None,
        typer.Option(
            "--product",
            "-p",
            metavar="NAME",
            help="Product name: 1-64 lower-case letters, digits, '.', '_' or '-' (e.g. bottle, tile-2).",
            show_default=False,
        ),
    ] = None,
    store: StoreOpt = None,
    output_format: Annotated[
        ListFormat, typer.Option("--format", "-f", help="Output format.", case_sensitive=False)
    ] = ListFormat.table,
) -> None:
    """List a product's model versions, newest first, with their manifest summary.

    Shows the backbone, input geometry, embedding channels, number of training images, the
    calibrated image and pixel thresholds, the size, a `*` on the version scoring uses (LATEST)
    and a `c` on candidates: retrained versions the promotion gate kept out of use (why: below the
    table; `padim models promote` puts one in use). Subcommands: `promote`, `prune`.

    Examples:

    \b
        padim models --product bottle
        padim models -p bottle --store s3://padim/store --format json
        padim models promote bottle v20261128T031500Z-3fa2c1
        padim models prune bottle --keep 5
    """
    from padim.errors import ConfigError, ModelNotFoundError
    from padim.store import ModelStore

    if ctx.invoked_subcommand is not None:
        return
    if product is None:
        raise ConfigError("name the product: padim models --product NAME (or padim models promote|prune ...)")
    check_product(product)
    model_store = ModelStore(resolve_store(store))
    versions = model_store.versions(product)
    if not versions:
        raise ModelNotFoundError(f"no model for product {product!r} in {model_store.root}")
    if output_format is ListFormat.json:
        print_json(
            [
                {
                    "version": v.version,
                    "created_at": v.created_at,
                    "latest": v.is_latest,
                    "candidate": v.is_candidate,
                    "candidate_reason": (v.candidate or {}).get("reason"),
                    "url": v.url,
                    "size_bytes": v.size_bytes,
                    **{k: val for k, val in v.summary.items() if k != "channel_indices"},
                }
                for v in versions
            ]
        )
        return
    print(f"Models of {product} in {model_store.root} (* = latest, used by score; c = candidate, not in use):")
    print(format_table(MODEL_HEADERS, model_rows(versions)))
    for info in versions:
        if info.is_candidate:
            print(f"c {info.version}: {(info.candidate or {}).get('reason') or 'not promoted'}")


@models_app.command("promote")
def models_promote(
    product: Annotated[str, typer.Argument(help="Product name.", show_default=False)],
    version: Annotated[str, typer.Argument(help="The version to put in use (see padim models).", show_default=False)],
    store: StoreOpt = None,
) -> None:
    """Put a version in use: a candidate the promotion gate kept out, or an older version (rollback).

    Score runs from now on use it (`LATEST`); a candidate stops being one. The previous version
    stays in the store.

    Examples:

    \b
        padim models promote bottle v20261128T031500Z-3fa2c1
    """
    from padim.store import ModelStore

    check_product(product)
    model_store = ModelStore(resolve_store(store))
    previous = model_store.promote(product, version)
    print(f"{product}: version {version} is in use (was {previous or 'none'})")


@models_app.command("prune")
def models_prune(
    product: Annotated[str, typer.Argument(help="Product name.", show_default=False)],
    keep: Annotated[
        int,
        typer.Option("--keep", min=1, metavar="N", help="Newest versions to keep (the one in use and candidates too)."),
    ],
    store: StoreOpt = None,
) -> None:
    """Remove a product's old model versions, keeping the N newest.

    The version in use and every candidate are never removed, however old. Training and
    retraining apply the same rule after each publish with the product's `keep_versions` (default
    from padim/settings.py, RetentionSettings).

    Examples:

    \b
        padim models prune bottle --keep 5
    """
    from padim.store import ModelStore

    check_product(product)
    model_store = ModelStore(resolve_store(store))
    removed = model_store.prune(product, keep)
    print(f"{product}: removed {len(removed)} version(s)" + (": " + ", ".join(removed) if removed else ""))


# ---- serve, retrain, configure, nightly, watch -------------------------------------------------


@app.command()
def serve(
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Most flow runs at once.", show_default=False)
    ] = None,
) -> None:
    """Serve the deployments (nightly, retrain, watch, train, score) from this process.

    The single-host alternative to a work pool and worker: reads `deployments/prefect.yaml`
    (schedules with time zones, event triggers, concurrency limits) and runs the flows here when
    they are due. It needs a running Prefect server for schedules and triggers: start one with
    `prefect server start` in another terminal and point this shell at it with
    `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`. Stop with Ctrl+C.

    Examples:

    \b
        prefect server start                    # in a first terminal
        export PREFECT_API_URL=http://127.0.0.1:4200/api
        PADIM_STORE=s3://padim/store padim serve
    """
    from padim_cli.environment import quiet_prefect_console
    from padim_cli.serving import check_server, serve_deployments

    check_server()
    quiet_prefect_console()
    serve_deployments(limit)


@app.command()
def retrain(
    product: ProductOpt,
    normal: Annotated[
        str | None,
        typer.Option(
            "--normal",
            metavar="URL",
            help="Folder of new good images. Default: the product's landing folder, else the one it was trained on.",
            show_default=False,
        ),
    ] = None,
    full: Annotated[bool, typer.Option("--full", help="Refit from scratch instead of adding the new images.")] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the event).")] = "manual",
    store: StoreOpt = None,
    batch_size: BatchOpt = default_of(TrainSettings, "batch_size"),
    device: DeviceOpt = Device(default_of(TrainSettings, "device")),
    runtime: RuntimeOpt = RuntimeChoice(default_of(TrainSettings, "runtime")),
    precision: PrecisionOpt = PrecisionChoice(default_of(TrainSettings, "precision")),
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per fit task.")] = default_of(
        TrainSettings, "shard_size"
    ),
    gate: Annotated[
        bool,
        typer.Option(
            "--gate/--no-gate",
            help="Put the new version in use only if it passes the promotion gate (else it stays a candidate).",
        ),
    ] = True,
    max_threshold_change: Annotated[
        float | None,
        typer.Option(
            "--max-threshold-change",
            min=0.0,
            metavar="FRACTION",
            help="Gate: largest relative move of the image threshold. Default: the product's setting, else "
            f"{default_of(GateSettings, 'max_threshold_change')}.",
            show_default=False,
        ),
    ] = None,
    fpr_tolerance: Annotated[
        float | None,
        typer.Option(
            "--fpr-tolerance",
            min=0.0,
            max=1.0,
            metavar="FRACTION",
            help="Gate: false alarms on the calibration pool may exceed the target FPR by this much. Default: the "
            f"product's setting, else {default_of(GateSettings, 'fpr_tolerance')}.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add newly arrived good images to a product's model, or refit it, and publish a new version.

    Incremental by default: images not yet in the model are embedded and merged into the latest
    version's statistics (exactly as if it had been fitted on all of them at once) and the
    thresholds are re-calibrated. `--full` refits from scratch on the old and new images. The
    retrain deployment runs this on the events `padim.normal-images.added` and
    `padim.drift.detected`.

    The new version is a candidate until it passes the promotion gate: its image threshold moves
    by less than --max-threshold-change, its false alarms on the product's calibration pool (the
    held-out good images of every batch so far) stay within the target + --fpr-tolerance, and it
    still flags the product's reference defects (`padim configure --reference-defects`). A
    rejected candidate is listed by `padim models` with the reason; `padim models promote` puts
    it in use. --no-gate puts the new version in use directly.

    Examples:

    \b
        padim retrain --product bottle --normal ./images/bottle/new-good
        padim retrain --product bottle --full
    """
    check_product(product)
    root = resolve_store(store)
    if normal is not None:
        normal = check_folder(absolute_url(normal, "normal images folder"), "normal images", root)
    check_model(root, product, None)
    result = run_flow(
        "retrain",
        product=product,
        reason=reason,
        normal_url=normal,
        full=full,
        store=root,
        batch_size=batch_size,
        device=device.value,
        runtime=runtime.value,
        precision=precision.value,
        shard_size=shard_size,
        gate=gate,
        max_threshold_change=max_threshold_change,
        fpr_tolerance=fpr_tolerance,
    )
    if as_json:
        print_json(result)
    elif result.get("status") == "unchanged":
        print(f"No new images for {product}: model {result['version']} unchanged")
    else:
        print("\n".join(train_lines(result)))
        print(f"  previous version    {result.get('previous_version')} ({'full refit' if full else 'incremental'})")
        decision = result.get("gate")
        if decision is not None and not decision.get("passed"):
            print(f"  CANDIDATE, not in use: {'; '.join(decision.get('reasons') or [])}")
            print(f"  in use              {result.get('in_use')} (padim models promote {product} {result['version']})")
        elif decision is not None:
            print("  promotion gate      passed: the new version is in use")


@app.command()
def configure(
    product: ProductOpt,
    incoming: Annotated[
        str | None,
        typer.Option(
            "--incoming",
            metavar="URL",
            help="Where each night's production images land; {date} becomes YYYY-MM-DD.",
            show_default=False,
        ),
    ] = None,
    landing: Annotated[
        str | None,
        typer.Option(
            "--landing",
            metavar="URL",
            help="Folder whose sub-folders are new batches of good images (for watch and retrain).",
            show_default=False,
        ),
    ] = None,
    reference_defects: Annotated[
        str | None,
        typer.Option(
            "--reference-defects",
            metavar="URL",
            help="Folder of known defect images a retrained model must still flag (promotion gate).",
            show_default=False,
        ),
    ] = None,
    max_threshold_change: Annotated[
        float | None,
        typer.Option(
            "--max-threshold-change",
            min=0.0,
            metavar="FRACTION",
            help="Promotion gate: largest relative move of the image threshold "
            f"(default {default_of(GateSettings, 'max_threshold_change')}).",
            show_default=False,
        ),
    ] = None,
    fpr_tolerance: Annotated[
        float | None,
        typer.Option(
            "--fpr-tolerance",
            min=0.0,
            max=1.0,
            metavar="FRACTION",
            help="Promotion gate: false alarms on the calibration pool may exceed the target FPR by this much "
            f"(default {default_of(GateSettings, 'fpr_tolerance')}).",
            show_default=False,
        ),
    ] = None,
    keep_versions: Annotated[
        int | None,
        typer.Option(
            "--keep-versions",
            min=0,
            metavar="N",
            help="Model versions kept after each publish, besides the one in use and candidates; 0 keeps all "
            f"(default {default_of(RetentionSettings, 'keep_versions')}).",
            show_default=False,
        ),
    ] = None,
    drift_min_images: Annotated[
        int | None,
        typer.Option(
            "--drift-min-images",
            min=1,
            metavar="N",
            help="Fewest scored images for a drift decision "
            f"(default {default_of(ScoreSettings, 'drift_min_images')}).",
            show_default=False,
        ),
    ] = None,
    drift_max_anomaly_rate: Annotated[
        float | None,
        typer.Option(
            "--drift-max-anomaly-rate",
            min=0.0,
            max=1.0,
            metavar="RATE",
            help="Share of anomalous images above which a night drifted (default: max(5 x the image FPR, 10 %)).",
            show_default=False,
        ),
    ] = None,
    drift_max_median_ratio: Annotated[
        float | None,
        typer.Option(
            "--drift-max-median-ratio",
            min=1.0,
            metavar="RATIO",
            help="Median score over the held-out median above which a night drifted "
            f"(default {default_of(ScoreSettings, 'drift_max_median_ratio')}).",
            show_default=False,
        ),
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Set where a product's images arrive, and its own gate, retention and drift settings.

    Writes `<store>/<product>/product.json`. The nightly flow scores every product with an
    incoming folder; the watch flow announces each new sub-folder of the landing folder once
    (event `padim.normal-images.added`, which triggers the retrain deployment). The other
    options override, for this product only, the defaults of padim/settings.py: the promotion
    gate of retrained models, how many versions are kept, and the nightly drift check (the
    nightly run uses a product's own bounds before its parameters). Without options, prints the
    current settings.

    Examples:

    \b
        padim configure --product bottle --incoming s3://factory/bottle/incoming/{date}
        padim configure --product bottle --landing s3://factory/bottle/new-good
    """
    from padim.products import read_product_settings, update_product_settings
    from padim.store import ModelStore

    check_product(product)
    model_store = ModelStore(resolve_store(store))
    changes = {
        "incoming_url": absolute_url(incoming, "incoming folder") if incoming is not None else None,
        "landing_url": absolute_url(landing, "landing folder") if landing is not None else None,
        "reference_defects_url": (
            absolute_url(reference_defects, "reference defects folder") if reference_defects is not None else None
        ),
        "max_threshold_change": max_threshold_change,
        "fpr_tolerance": fpr_tolerance,
        "keep_versions": keep_versions,
        "drift_min_images": drift_min_images,
        "drift_max_anomaly_rate": drift_max_anomaly_rate,
        "drift_max_median_ratio": drift_max_median_ratio,
    }
    if all(value is None for value in changes.values()):
        settings = read_product_settings(model_store, product)
    else:
        settings = update_product_settings(model_store, product, **changes)
        print(f"Saved the settings of {product} in {model_store.root}")
    for name, value in settings.model_dump().items():
        print(f"  {name:<24}{value if value is not None else '-'}")
    if incoming and "{date}" not in incoming:
        print("  note: --incoming has no {date}: every night scores the same folder")


@app.command()
def nightly(
    date: Annotated[
        datetime | None,
        typer.Option(
            "--date",
            formats=["%Y-%m-%d"],
            metavar="YYYY-MM-DD",
            help="Production date. Default: today (UTC) minus --days-ago.",
            show_default=False,
        ),
    ] = None,
    days_ago: Annotated[int, typer.Option("--days-ago", min=0, help="Score the images of this many days ago.")] = 0,
    products: Annotated[
        list[str] | None,
        typer.Option("--product", "-p", metavar="NAME", help="Only these products (repeatable).", show_default=False),
    ] = None,
    store: StoreOpt = None,
    device: DeviceOpt = Device(default_of(ScoreSettings, "device")),
    runtime: RuntimeOpt = RuntimeChoice(default_of(ScoreSettings, "runtime")),
    precision: PrecisionOpt = PrecisionChoice(default_of(ScoreSettings, "precision")),
    drift_min_images: DriftMinImagesOpt = default_of(ScoreSettings, "drift_min_images"),
    drift_max_anomaly_rate: DriftMaxRateOpt = default_of(ScoreSettings, "drift_max_anomaly_rate"),
    drift_max_median_ratio: DriftMaxRatioOpt = default_of(ScoreSettings, "drift_max_median_ratio"),
    as_json: JsonOpt = False,
) -> None:
    """Score the night's images of every configured product (what the nightly deployment runs).

    Each product with an incoming folder (see `padim configure`) is scored with its latest model;
    a product that fails does not stop the others, and the command fails at the end if any did.
    A store that does not exist or holds no model, no configured product, or a missing incoming
    folder fail with an error naming what to set; a night when nothing arrived is reported as such.
    Drift bounds: the product's own (`padim configure --drift-...`), else these options.

    Examples:

    \b
        padim nightly --date 2026-11-25
        padim nightly --days-ago 1 --product bottle --product tile
    """
    for name in products or []:
        check_product(name)
    root = resolve_store(store)
    result = run_flow(
        "nightly",
        store=root,
        date=iso_day(date.date() if date else None),
        days_ago=days_ago,
        products=list(products) if products else None,
        device=device.value,
        runtime=runtime.value,
        precision=precision.value,
        drift_min_images=drift_min_images,
        drift_max_anomaly_rate=drift_max_anomaly_rate,
        drift_max_median_ratio=drift_max_median_ratio,
    )
    if as_json:
        print_json(result)
        return
    for name, outcome in result["products"].items():
        if outcome.get("nothing_arrived"):
            print(f"{name} {result['date']}: nothing arrived (no image under {outcome['images_url']})")
            continue
        print(
            f"{name} {result['date']}: {outcome['n_scored']} scored, {outcome['n_skipped']} skipped, "
            f"{outcome['n_anomalies']} anomalies, {outcome['n_errors']} errors"
        )


@app.command()
def watch(
    store: StoreOpt = None,
    product: Annotated[
        str | None, typer.Option("--product", "-p", metavar="NAME", help="Only this product.", show_default=False)
    ] = None,
    settle_seconds: Annotated[
        float, typer.Option("--settle-seconds", min=0.0, help="A batch must be unchanged this long to be announced.")
    ] = default_of(WatchSettings, "settle_seconds"),
    as_json: JsonOpt = False,
) -> None:
    """Look once for new batches of good images in the products' landing folders.

    Emits the event `padim.normal-images.added` once per new, settled batch (a sub-folder of the
    landing folder set with `padim configure --landing`); with a Prefect server and the retrain
    deployment served, each event starts a retrain. The watch deployment runs this on an interval.

    Examples:

    \b
        padim watch
        padim watch --product bottle --settle-seconds 0
    """
    if product is not None:
        check_product(product)
    announced = run_flow("watch", store=resolve_store(store), product=product, settle_seconds=settle_seconds)
    if as_json:
        print_json(announced)
        return
    if not announced:
        print("No new batch of good images")
    for batch in announced:
        print(
            f"{batch['product']}: announced batch {batch['batch']} ({batch['n_images']} images) at {batch['batch_url']}"
        )


# ---- entry point ----------------------------------------------------------------------------

_GLOBAL_FLAGS = frozenset({"--verbose", "-v", "--debug"})


def hoist_global_flags(args: Sequence[str]) -> list[str]:
    """Move ``--verbose``/``--debug`` given after the command name in front of it.

    Args:
        args: Command-line arguments without the program name.

    Returns:
        The arguments with global flags first.
    """
    flags = [a for a in args if a in _GLOBAL_FLAGS]
    rest = [a for a in args if a not in _GLOBAL_FLAGS]
    return flags + rest


def fail(message: str, code: int) -> None:
    """Print ``error: <message>`` on standard error and exit."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line.

    Args:
        argv: Arguments without the program name; default ``sys.argv[1:]``.
    """
    args = hoist_global_flags(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, prog_name="padim")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:
        if debug_enabled():
            raise
        fail(describe_error(exc), exit_code_for(exc))


if __name__ == "__main__":
    main()
