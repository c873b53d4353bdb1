"""``padim evaluate``: accuracy of a configuration on a labelled data set (MVTec layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["metric_lines", "run_evaluation"]


def _value(value: float | None, digits: int = 4) -> str:
    """A metric with fixed decimals, or ``n/a``."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def metric_lines(result: Any) -> list[str]:
    """Readable lines of an :class:`padim.evaluation.EvaluationResult`.

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
        config: Model configuration (:class:`padim.config.PadimConfig`).
        settings: Fit and calibration options (:class:`padim.settings.TrainSettings`).
        json_file: Where to write the metrics as JSON, if anywhere.
        figures: Folder of per-image figures, if any.
        roc: Also draw the ROC curves.
    """
    from padim.evaluation import evaluate_dataset, write_json

    result = evaluate_dataset(dataset_dir, config, settings, figures_dir=figures, roc=roc)
    print("\n".join(metric_lines(result)))
    if json_file is not None:
        write_json(result, json_file)
        print(f"  metrics JSON        {json_file}")
    if figures is not None:
        print(f"  figures             {figures}/<kind>/<image>.png" + (", roc_image.png, roc_pixel.png" if roc else ""))
