"""Evaluate a PaDiM configuration on an MVTec-layout data set: run, summarise, draw.

:func:`evaluate_dataset` is what ``padim evaluate`` runs: :func:`padim.evaluation.run.run_evaluation`
(fit, calibrate and score through the engine the jobs run), :func:`padim.evaluation.results.summarize`
(the metrics) and, optionally, :func:`padim.evaluation.figures.write_figures`.
"""

from __future__ import annotations

from pathlib import Path

from padim.core.config import PadimConfig
from padim.evaluation.figures import write_figures
from padim.evaluation.results import EvaluationResult, summarize
from padim.evaluation.run import run_evaluation
from padim.settings import TrainSettings

__all__ = ["evaluate_dataset"]


def evaluate_dataset(
    dataset_dir: str | Path,
    config: PadimConfig | None = None,
    settings: TrainSettings | None = None,
    *,
    merge_holdout: bool = True,
    figures_dir: str | Path | None = None,
    roc: bool = False,
) -> EvaluationResult:
    """Fit on ``train/good`` (with a calibration hold-out), score ``test/*`` and compute metrics.

    Args:
        dataset_dir: MVTec-layout data set (local folder or fsspec URL).
        config: Model options (default :class:`PadimConfig()`).
        settings: How to fit and calibrate (default :class:`TrainSettings()`, as ``padim train``);
            ``holdout_fraction=0`` disables calibration.
        merge_holdout: Merge the hold-out into the final statistics after calibrating.
        figures_dir: When set, write a heat-map panel per test image there.
        roc: Also write ``roc_image.png`` and ``roc_pixel.png`` (needs ``figures_dir``).

    Returns:
        The metrics; ``result.to_dict()`` is flat and JSON-ready.

    Raises:
        DatasetLayoutError: If the data set is not in the MVTec layout or a test image or mask
            cannot be read.
        ValueError: If ``roc`` is requested without ``figures_dir`` or an option is invalid.
    """
    if roc and figures_dir is None:
        raise ValueError("roc=True needs figures_dir: the ROC curves are written there")
    run = run_evaluation(dataset_dir, config, settings, merge_holdout=merge_holdout)
    result = summarize(run)
    if figures_dir is not None:
        write_figures(run, result, figures_dir, roc=roc)
    return result
