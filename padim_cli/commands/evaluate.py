"""``padim evaluate``: accuracy of a configuration on a labelled data set (MVTec layout).

No Prefect and no store: :func:`run_evaluation` fits and scores in this process through
:mod:`padim.evaluation` (imported only when the command runs) and prints :func:`metric_lines`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
    BackboneOpt,
    BatchOpt,
    ChannelsOpt,
    CropOpt,
    Device,
    DeviceOpt,
    HoldoutOpt,
    ImageFprOpt,
    ImageSizeOpt,
    NeighbourhoodOpt,
    NoCropOpt,
    PixelFprOpt,
    PrecisionChoice,
    PrecisionOpt,
    ReferenceOpt,
    RegistrationChoice,
    RegistrationOpt,
    RuntimeChoice,
    RuntimeOpt,
    StatisticsChoice,
    StatisticsOpt,
    ToleranceOpt,
    WeightsOpt,
    remedy_options,
)

__all__ = ["evaluate", "metric_lines", "run_evaluation"]


def evaluate(
    dataset_dir: Annotated[
        str,
        typer.Argument(metavar="DATASET_DIR", help="Data set in MVTec AD layout (train/good, test/*, ground_truth/*)."),
    ],
    backbone: BackboneOpt = Backbone(default_of(PadimConfig, "backbone")),
    weights: WeightsOpt = None,
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
    from padim_prefect.flows.params import build_config

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
    run_evaluation(dataset_dir, config, settings, json_file=json_file, figures=figures, roc=roc)


def _value(value: float | None, digits: int = 4) -> str:
    """A metric with fixed decimals, or ``n/a``."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def metric_lines(result: Any) -> list[str]:
    """Readable lines of an :class:`padim.evaluation.results.EvaluationResult`.

    Args:
        result: The evaluation result.

    Returns:
        Lines to print.
    """
    config = result.config
    geometry = f"resize {config.image_size}" + (f", crop {config.crop_size}" if config.crop_size else "")
    lines = [
        f"Evaluation of {result.dataset}",
        f"  model               {config.backbone}, d={config.channels or 'default'}, {geometry}, {result.device}",
        "  unaligned parts     "
        + (", ".join(f"{k}={v}" for k, v in config.remedies().items()) or "no remedy (plain PaDiM)"),
        f"  images              {result.n_train} train ({result.n_holdout} held out for calibration), "
        f"{result.n_test} test ({result.n_test_anomalous} defective)",
        f"  image AUROC         {_value(result.image_auroc)}",
        f"  pixel AUROC         {_value(result.pixel_auroc)}",
        f"  AUPRO (FPR<=0.3)    {_value(result.aupro)}",
    ]
    for kind, auroc in sorted(result.image_auroc_per_kind.items()):
        lines.append(f"    {kind:<17} {_value(auroc)} image AUROC")
    if result.calibrated_threshold is not None:
        lines.append(
            f"  calibrated threshold {_value(result.calibrated_threshold, 3)} (label-free, target FPR "
            f"{_value(result.calibrated_image_fpr_target, 3)}): precision {_value(result.calibrated_precision, 3)}, "
            f"recall {_value(result.calibrated_recall, 3)}, FPR {_value(result.calibrated_fpr, 3)}"
        )
    lines.append(
        f"  oracle F1-max       image {_value(result.image_f1_max, 3)}, pixel {_value(result.pixel_f1_max, 3)} "
        "(thresholds chosen on the test labels; for comparison only)"
    )
    lines.append(
        f"  speed               fit {result.fit_images_per_s:.1f} img/s, score {result.score_images_per_s:.1f} img/s, "
        f"peak memory {result.peak_rss_mb:.0f} MiB"
    )
    return lines


def run_evaluation(
    dataset_dir: str,
    config: Any,
    settings: Any,
    *,
    json_file: Path | None,
    figures: Path | None,
    roc: bool,
) -> None:
    """Evaluate, print the metrics and write the optional JSON and figures.

    Args:
        dataset_dir: MVTec-layout data set.
        config: Model configuration (:class:`padim.core.config.PadimConfig`).
        settings: Fit and calibration options (:class:`padim.settings.TrainSettings`).
        json_file: Where to write the metrics as JSON, if anywhere.
        figures: Folder of per-image figures, if any.
        roc: Also draw the ROC curves.
    """
    from padim.evaluation.evaluate import evaluate_dataset
    from padim.evaluation.results import write_json

    result = evaluate_dataset(dataset_dir, config, settings, figures_dir=figures, roc=roc)
    print("\n".join(metric_lines(result)))
    if json_file is not None:
        write_json(result, json_file)
        print(f"  metrics JSON        {json_file}")
    if figures is not None:
        print(f"  figures             {figures}/<kind>/<image>.png" + (", roc_image.png, roc_pixel.png" if roc else ""))
