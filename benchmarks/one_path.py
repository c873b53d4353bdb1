"""``padim evaluate`` against the train and score flows on one data set, in one process.

Runs :func:`padim.evaluation.run.run_evaluation` with every default (what ``padim evaluate DATASET``
runs), then the train flow on ``DATASET/train/good`` and the score flow on ``DATASET/test`` (what
``padim train`` / ``padim score`` run, heat maps off), in a fresh store. Prints one JSON line: the
wall time and images/s of each, the largest relative difference between evaluate's test scores and
the report's, and both image thresholds. A local Prefect server is started (by a trivial flow)
before anything is timed.

    python benchmarks/one_path.py ../shared/datasets/magnetic_tile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PADIM_PROGRESS", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="data set in MVTec layout")
    args = parser.parse_args(argv)

    from padim_prefect.flows.score import score
    from padim_prefect.flows.train import train
    from prefect import flow

    from padim.evaluation.results import summarize
    from padim.evaluation.run import run_evaluation
    from padim.reports import query_reports

    @flow(name="warm-up")
    def warm_up() -> None:
        return None

    warm_up()
    start = time.perf_counter()
    run = run_evaluation(args.dataset)
    evaluate_seconds = time.perf_counter() - start
    result = summarize(run)
    with tempfile.TemporaryDirectory(prefix="padim-one-path-") as work:
        store = str(Path(work) / "store")
        start = time.perf_counter()
        trained = train(product="p", normal_url=str(args.dataset / "train" / "good"), store=store)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        night = score(
            product="p", images_url=str(args.dataset / "test"), store=store, date="2026-11-30", heatmaps=False
        )
        score_seconds = time.perf_counter() - start
        rows = query_reports(store, product="p")
    reported = dict(zip(rows["image_uri"], rows["score"], strict=True))
    difference = max(abs(reported[image.uri] - s) / s for image, s in zip(run.test, run.scores, strict=True))
    print(
        json.dumps(
            {
                "dataset": str(args.dataset),
                "n_train": result.n_train,
                "n_test": result.n_test,
                "evaluate_seconds": evaluate_seconds,
                "evaluate_fit_images_per_s": result.fit_images_per_s,
                "evaluate_score_images_per_s": result.score_images_per_s,
                "train_flow_seconds": train_seconds,
                "train_flow_images_per_s": trained["n_train"] / train_seconds,
                "score_flow_seconds": score_seconds,
                "score_flow_images_per_s": night["n_scored"] / score_seconds,
                "image_threshold_evaluate": float(run.thresholds.image) if run.thresholds else None,
                "image_threshold_train": trained["image_threshold"],
                "largest_relative_score_difference": float(difference),
                "image_auroc": result.image_auroc,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
