"""Figures of an evaluation: a heat-map panel per test image and the image and pixel ROC curves.

Panels are drawn by :func:`padim.reports.visualize.render_panel`; the ROC curves with matplotlib's
Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from padim.evaluation.mvtec import TestImage, apply_geometry, image_stem
from padim.evaluation.results import EvaluationResult
from padim.evaluation.run import EvaluationRun
from padim.io.loading import load_pil
from padim.reports.visualize import render_panel

__all__ = ["write_figures"]


def _figure_name(image: TestImage) -> str:
    """``<kind>/<stem>.png``."""
    return f"{image.kind}/{image_stem(image.uri)}.png"


def write_figures(
    run: EvaluationRun, result: EvaluationResult, figures_dir: str | Path, roc: bool = False
) -> list[Path]:
    """Write one panel per test image and, optionally, the ROC curves.

    Panels (``figures_dir/<kind>/<stem>.png``): the model's view of the image, the ground-truth
    mask, the anomaly heat map overlaid (one colour scale for the whole test set, from its
    smallest to its largest map value) with the calibrated pixel threshold's outline, and the
    predicted mask (``map > calibrated pixel threshold``; the oracle pixel threshold when no
    hold-out was used). ROC curves: ``roc_image.png`` and ``roc_pixel.png``.

    Args:
        run: The evaluation run (images are re-read for the panels).
        result: Its metrics (AUROCs in the ROC legends, thresholds).
        figures_dir: Local output folder (created).
        roc: Also write the ROC curves.

    Returns:
        The paths written.
    """
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    threshold = run.thresholds.pixel if run.thresholds is not None else result.pixel_f1_threshold
    vmin, vmax = float(run.maps.min()), float(run.maps.max())
    if not vmax > vmin:
        vmax = vmin + 1.0
    written: list[Path] = []
    for index, image in enumerate(run.test):
        view = apply_geometry(load_pil(image.uri), run.config, Image.Resampling.BILINEAR)
        verdict = ""
        if run.thresholds is not None:
            verdict = "  anomalous" if run.scores[index] > run.thresholds.image else "  normal"
        title = f"{image.kind}/{image_stem(image.uri)}  score {run.scores[index]:.2f}{verdict}"
        panel = render_panel(view, run.masks[index], run.maps[index], threshold, vmin, vmax, title)
        path = out / _figure_name(image)
        path.parent.mkdir(parents=True, exist_ok=True)
        panel.save(path)
        written.append(path)
    if roc:
        written.extend(_write_roc_figures(result, out))
    return written


def _write_roc_figures(result: EvaluationResult, out: Path) -> list[Path]:
    """Plot the image and pixel ROC curves with matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths: list[Path] = []
    for name, curve, auc in (
        ("image", result.image_roc, result.image_auroc),
        ("pixel", result.pixel_roc, result.pixel_auroc),
    ):
        if curve is None:
            continue
        figure = Figure(figsize=(4.5, 4.5), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        axes.plot(curve.fpr, curve.tpr, label=f"{name} AUROC {auc:.4f}")
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
        axes.set_xlabel("false-positive rate")
        axes.set_ylabel("true-positive rate")
        axes.set_title(f"{name} ROC")
        axes.legend(loc="lower right")
        figure.tight_layout()
        path = out / f"roc_{name}.png"
        figure.savefig(path)
        paths.append(path)
    return paths
