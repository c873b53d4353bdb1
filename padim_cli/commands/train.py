"""``padim train`` and ``padim retrain``: fit a product's model and publish it as a new version.

Both run their Prefect flow in this process (:func:`padim_cli.runner.run_flow`); the flows are
imported only when a command runs.
"""

from __future__ import annotations

from typing import Annotated

import typer

from padim.core.config import PadimConfig
from padim.settings import TrainSettings, default_of
from padim_cli.options import (
    AugmentCopiesOpt,
    AugmentFlipOpt,
    AugmentRotationOpt,
    AugmentSeedOpt,
    AugmentShiftOpt,
    Backbone,
    BatchOpt,
    ChannelsOpt,
    CropOpt,
    DaskOpt,
    DaskWorkersOpt,
    Device,
    DeviceOpt,
    FitShardOpt,
    FprToleranceOpt,
    HoldoutOpt,
    ImageFprOpt,
    ImageSizeOpt,
    JsonOpt,
    MaxThresholdChangeOpt,
    NeighbourhoodOpt,
    NoCropOpt,
    PixelFprOpt,
    PrecisionChoice,
    PrecisionOpt,
    ProductOpt,
    ReferenceOpt,
    RegistrationChoice,
    RegistrationOpt,
    RuntimeChoice,
    RuntimeOpt,
    StatisticsChoice,
    StatisticsOpt,
    StoreOpt,
    ToleranceOpt,
    remedy_options,
)
from padim_cli.render import print_json, train_lines
from padim_cli.runner import (
    absolute_url,
    check_backbone,
    check_folder,
    check_model,
    check_product,
    resolve_store,
    run_flow,
)

__all__ = ["retrain", "train"]


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
    shard_size: FitShardOpt = default_of(TrainSettings, "shard_size"),
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
    from padim_prefect.flows.params import build_config

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
    shard_size: FitShardOpt = default_of(TrainSettings, "shard_size"),
    gate: Annotated[
        bool,
        typer.Option(
            "--gate/--no-gate",
            help="Put the new version in use only if it passes the promotion gate (else it stays a candidate).",
        ),
    ] = True,
    max_threshold_change: MaxThresholdChangeOpt = None,
    fpr_tolerance: FprToleranceOpt = None,
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
    held-out good images of every batch so far, each scored by the model without its batch) stay
    within max(target, 1 / (n + 1)) + --fpr-tolerance for a threshold set on n held-out images,
    and it still flags the product's reference defects (`padim configure --reference-defects`). A
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
