"""Detection accuracy of PaDiM variants on the real data sets, against anomalib's figures.

Runs :func:`padim.evaluation.run.run_evaluation` on ``mvtec_bottle`` and ``magnetic_tile`` (MVTec
layout, ``../shared/datasets``) for predefined configurations, prints one JSON line per
(data set, variant) and refreshes the generated section of ``BENCHMARKS.md``
(between the ``accuracy:begin`` / ``accuracy:end`` markers; the rest of the file is kept).
Results accumulate in ``benchmarks/results/accuracy.json`` (latest run per data set and variant),
so variants can be measured in separate invocations.

Every (data set, variant) runs in a fresh subprocess so that its peak RSS is its own.

Besides the metrics, each run records a calibration study: label-free thresholds set on the
held-out normal images (fit-set-only model), then applied to the test set scored by the final
model (hold-out merged into the statistics) and by the fit-set-only model.

Parts that are not aligned (issue 18): a data set may be given as ``NAME@PERTURBATION``, where the
perturbation is ``aligned`` (the data set itself) or one of :data:`perturbation.PERTURBATIONS`
(``shifted``, ``any_angle``: a seeded, cached copy with every image and mask shifted and rotated,
see ``benchmarks/perturbation.py``). These runs are stored under ``"<dataset>@<perturbation>/<variant>"``
and fill their own generated section of ``BENCHMARKS.md`` (``robustness:begin`` / ``robustness:end``),
one table of variant x data set x perturbation. ``--robustness`` selects all six.

This module runs the measurements and keeps the results store; what is measured (variants, data
sets, perturbations, anchors) is in ``benchmarks/accuracy_variants.py``, the markdown rendering in
``benchmarks/accuracy_markdown.py``.

Usage::

    python benchmarks/accuracy.py                      # the paper protocol on both data sets
    python benchmarks/accuracy.py --variant oas        # one variant
    python benchmarks/accuracy.py --all-variants       # every variant (about 20 min on 2 cores)
    python benchmarks/accuracy.py --dataset mvtec_bottle --variant paper --no-write
    python benchmarks/accuracy.py --robustness --variant default   # aligned + perturbed, both data sets
    python benchmarks/accuracy.py --dataset mvtec_bottle@any_angle --variant default
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # siblings beside this file, however imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_markdown import write_markdown
from accuracy_variants import (
    ALIGNED,
    DATASETS,
    IMAGE_FPR_TARGETS,
    PIXEL_FPR_TARGETS,
    VARIANT_SETTINGS,
    VARIANTS,
    perturbation_names,
    result_key,
    unsupported_reason,
    variant_config,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS_DIR = REPO.parent / "shared" / "datasets"
RESULTS = REPO / "benchmarks" / "results" / "accuracy.json"

# --------------------------------------------------------------------------------------------
# Worker: one (data set, variant) in this process
# --------------------------------------------------------------------------------------------


def _fraction_above(values: np.ndarray, threshold: float) -> float:
    return float(np.count_nonzero(values > threshold) / values.size)


def calibration_study(run: Any) -> dict[str, float]:
    """Label-free thresholds from the hold-out, applied to the test set with and without merging.

    Args:
        run: An :class:`~padim.evaluation.run.EvaluationRun` made with ``compare_unmerged=True``.

    Returns:
        Flat ``cal_*`` figures: for each image target, the FPR on the good test images and the
        recall on the defective ones, for the merged (final) and the fit-set-only model; for each
        pixel target, the FPR on the good test images' pixels for both models and the pixel
        precision, recall and F1 over all test pixels (final model).
    """
    from padim.core.calibration import threshold_at_fpr
    from padim.evaluation.metrics import rates_at_threshold

    labels = run.labels
    study: dict[str, float] = {"cal_n_holdout": float(run.holdout_scores.size), "cal_n_good": float((~labels).sum())}
    for target in IMAGE_FPR_TARGETS:
        threshold = threshold_at_fpr(run.holdout_scores, target)
        for tag, scores in (("merged", run.scores), ("unmerged", run.unmerged_scores)):
            study[f"cal_image_{target}_fpr_{tag}"] = _fraction_above(scores[~labels], threshold)
            study[f"cal_image_{target}_recall_{tag}"] = _fraction_above(scores[labels], threshold)
    good_maps = run.maps[~labels]
    for target in PIXEL_FPR_TARGETS:
        threshold = threshold_at_fpr(run.holdout_maps, target)
        study[f"cal_pixel_{target}_fpr_merged"] = _fraction_above(good_maps, threshold)
        study[f"cal_pixel_{target}_fpr_unmerged"] = _fraction_above(run.unmerged_good_maps, threshold)
        rates = rates_at_threshold(run.masks, run.maps, threshold)
        study[f"cal_pixel_{target}_precision"] = rates.precision
        study[f"cal_pixel_{target}_recall"] = rates.recall
        study[f"cal_pixel_{target}_f1"] = rates.f1
    return study


def run_worker(
    dataset_dir: Path, variant: str, batch_size: int, label: str | None = None, perturbation_seed: int = 0
) -> dict[str, Any]:
    """Evaluate one variant on one data set in this process.

    Args:
        dataset_dir: The folder to evaluate on (for a perturbation: its cached copy).
        variant: Name in :data:`VARIANTS`.
        batch_size: Images per batch.
        label: ``NAME@PERTURBATION`` for the robustness table (``None``: the plain accuracy table,
            named after the folder).
        perturbation_seed: Seed of the perturbed copy (recorded only).

    Returns:
        The flat evaluation result plus ``dataset_name``, ``variant``, the calibration study,
        ``wall_seconds`` (and ``perturbation``, ``perturbation_seed`` with a label); fit and score
        images/s and the peak RSS of this process come from the evaluation itself. For a variant
        that cannot run here, only ``dataset_name``, ``variant`` and ``unsupported`` (the reason).
    """
    import torch

    from padim.evaluation.results import summarize
    from padim.evaluation.run import run_evaluation
    from padim.settings import TrainSettings

    name, perturbation = parse_dataset(label) if label else (dataset_dir.name, None)
    reason = unsupported_reason(variant)
    if reason:
        return {"dataset_name": name, "variant": variant, "unsupported": reason}
    start = time.perf_counter()
    # The shipped training settings (hold-out share, target rates...), as `padim train` uses them.
    settings = TrainSettings(batch_size=batch_size, **VARIANT_SETTINGS.get(variant, {}))
    run = run_evaluation(dataset_dir, variant_config(variant), settings, compare_unmerged=True)
    result = summarize(run).to_dict()
    result.update(calibration_study(run))
    if perturbation is not None:
        result.update(perturbation=perturbation, perturbation_seed=perturbation_seed)
    result.update(
        dataset_name=name,
        variant=variant,
        wall_seconds=time.perf_counter() - start,
        measured_at=time.strftime("%Y-%m-%d %H:%M", time.localtime()),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    )
    return result


def seed_study(dataset_dir: Path, seeds: list[int], batch_size: int) -> list[dict[str, Any]]:
    """How much the paper protocol depends on *which* 100 random channels are drawn.

    Each seed's configuration is evaluated through :func:`padim.evaluation.run.run_evaluation` (the
    engine every job runs) on all of ``train/good`` (the paper protocol, no hold-out).

    Args:
        dataset_dir: MVTec-layout data set.
        seeds: Seeds of the channel draw.
        batch_size: Images per batch.

    Returns:
        One row per seed: ``seed``, ``image_auroc``, ``pixel_auroc``, ``aupro``.
    """
    from padim.evaluation.results import summarize
    from padim.evaluation.run import run_evaluation
    from padim.settings import TrainSettings

    settings = TrainSettings(holdout_fraction=0.0, batch_size=batch_size)
    rows = []
    for seed in seeds:
        config = variant_config("paper").model_copy(update={"seed": seed})
        result = summarize(run_evaluation(dataset_dir, config, settings))
        rows.append(
            {
                "dataset_name": dataset_dir.name,
                "seed": seed,
                "image_auroc": result.image_auroc,
                "pixel_auroc": result.pixel_auroc,
                "aupro": result.aupro,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Parent: subprocess per run, results store (the markdown: accuracy_markdown.py)
# --------------------------------------------------------------------------------------------


def run_subprocess(
    dataset_dir: Path, variant: str, batch_size: int, label: str | None = None, perturbation_seed: int = 0
) -> dict[str, Any]:
    """Run one (data set, variant) in a fresh interpreter and parse its JSON line."""
    extra = [] if label is None else ["--dataset-label", label, "--perturbation-seed", str(perturbation_seed)]
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--dataset-dir",
        str(dataset_dir),
        "--variant",
        variant,
        "--batch-size",
        str(batch_size),
        *extra,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if completed.returncode != 0:
        raise RuntimeError(f"{dataset_dir.name}/{variant} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def load_results(path: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Stored results keyed ``"<dataset>/<variant>"``."""
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def save_results(results: dict[str, dict[str, Any]], path: Path = RESULTS) -> None:
    """Write the results store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def store_result(key: str, result: dict[str, Any]) -> None:
    """Add one result to the store (re-read first: other invocations may have written) and
    refresh the markdown."""
    results = load_results()
    results[key] = result
    save_results(results)
    write_markdown(results)


def parse_dataset(spec: str) -> tuple[str, str | None]:
    """Split a ``--dataset`` value into the data set and its perturbation.

    Args:
        spec: ``NAME`` (the plain accuracy table) or ``NAME@PERTURBATION`` (the robustness
            table; ``NAME@aligned`` is the data set itself).

    Returns:
        ``(name, perturbation)``; ``perturbation`` is ``None`` for a plain ``NAME``.

    Raises:
        ValueError: If the name or the perturbation is unknown.
    """
    name, _, perturbation = spec.partition("@")
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r} in {spec!r}; choose from {list(DATASETS)}")
    if "@" not in spec:
        return name, None
    if perturbation not in perturbation_names():
        raise ValueError(f"unknown perturbation {perturbation!r} in {spec!r}; choose from {list(perturbation_names())}")
    return name, perturbation


def _dataset_spec(value: str) -> str:
    """argparse type of ``--dataset``: a valid spec, unchanged."""
    try:
        parse_dataset(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value


def resolve_dataset(spec: str, datasets_dir: Path, seed: int) -> Path:
    """The folder to evaluate for a ``--dataset`` value, building a perturbed copy when needed.

    Args:
        spec: ``NAME`` or ``NAME@PERTURBATION``.
        datasets_dir: Folder holding the source data sets.
        seed: Seed of the perturbed copy.

    Returns:
        The source folder (``NAME``, ``NAME@aligned``) or the cached perturbed copy.

    Raises:
        SystemExit: If the source data set is missing.
    """
    from perturbation import ensure_perturbed

    name, perturbation = parse_dataset(spec)
    source = datasets_dir / name
    if not source.is_dir():
        raise SystemExit(f"data set not found: {source}")
    if perturbation in (None, ALIGNED):
        return source
    return ensure_perturbed(source, perturbation, seed)


def _selected(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    robust = [f"{d}@{p}" for d in DATASETS for p in perturbation_names()] if args.robustness else []
    datasets = [*(args.dataset or ([] if robust else list(DATASETS))), *robust]
    variants = list(VARIANTS) if args.all_variants else (args.variant or ["paper"])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    return datasets, variants


def run_seed_study(args: argparse.Namespace, datasets: list[str]) -> int:
    """Run :func:`seed_study` on each data set, print and store the rows, refresh the markdown."""
    if any("@" in d for d in datasets):
        raise SystemExit("--seed-study runs on the aligned data sets only (no NAME@PERTURBATION)")
    for dataset in datasets:
        rows = seed_study(args.datasets_dir / dataset, list(range(args.seed_study)), args.batch_size)
        for row in rows:
            print(json.dumps(row), flush=True)
        if not args.no_write:
            store_result(f"{dataset}/seed_study", {"variant": "seed_study", "dataset_name": dataset, "rows": rows})
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets-dir", type=Path, default=DEFAULT_DATASETS_DIR)
    parser.add_argument(
        "--dataset",
        action="append",
        type=_dataset_spec,
        help=f"repeatable; one of {list(DATASETS)}, or NAME@PERTURBATION with PERTURBATION aligned, shifted or "
        "any_angle (the robustness table); default: both",
    )
    parser.add_argument(
        "--robustness", action="store_true", help="add both data sets @aligned, @shifted and @any_angle"
    )
    parser.add_argument("--perturbation-seed", type=int, default=0, help="seed of the perturbed copies (default 0)")
    parser.add_argument("--variant", action="append", help=f"repeatable; one of {list(VARIANTS)}; default: paper")
    parser.add_argument("--all-variants", action="store_true")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ untouched")
    parser.add_argument("--markdown-only", action="store_true", help="regenerate the markdown from stored results")
    parser.add_argument("--seed-study", type=int, metavar="N", help="paper protocol with channel seeds 0..N-1")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dataset-label", help=argparse.SUPPRESS)
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.worker:
        result = run_worker(
            args.dataset_dir, args.variant[0], args.batch_size, args.dataset_label, args.perturbation_seed
        )
        print(json.dumps(result), flush=True)
        return 0
    if args.markdown_only:
        write_markdown(load_results())
        return 0
    datasets, variants = _selected(args)
    if args.seed_study:
        return run_seed_study(args, datasets)
    missing = sorted(
        {parse_dataset(d)[0] for d in datasets} - {p.name for p in args.datasets_dir.glob("*") if p.is_dir()}
    )
    if missing:
        raise SystemExit(f"data sets not found under {args.datasets_dir}: {missing}")
    runnable = []
    for variant in variants:
        reason = unsupported_reason(variant)
        if reason:
            print(f"skipping variant {variant}: {reason}", flush=True)
        else:
            runnable.append(variant)
    for dataset in datasets:
        if not runnable:
            break
        folder = resolve_dataset(dataset, args.datasets_dir, args.perturbation_seed)
        label = dataset if "@" in dataset else None
        for variant in runnable:
            result = run_subprocess(folder, variant, args.batch_size, label, args.perturbation_seed)
            print(json.dumps(result), flush=True)
            if "unsupported" in result:
                print(f"skipping variant {variant} on {dataset}: {result['unsupported']}", flush=True)
            elif not args.no_write:
                store_result(result_key(dataset, variant), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
