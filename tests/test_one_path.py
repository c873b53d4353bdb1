"""``padim evaluate`` measures what ships: on MVTec AD bottle it gives the figures of the train and score flows.

Evaluation (:func:`padim.evaluation.run.run_evaluation`, what ``padim evaluate`` runs with its defaults)
and the train + score flows (what ``padim train`` / ``padim score`` run with theirs) go through the
same engine, the same hold-out split, the same calibration and the same defaults: the thresholds and
every test image's score must agree, and the accuracy they imply must be the published one. About
a minute on two CPU cores; skipped where ``../shared/datasets`` is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from padim_prefect.flows.score import score
from padim_prefect.flows.train import train
from sklearn.metrics import roc_auc_score

from padim.evaluation.results import summarize
from padim.evaluation.run import run_evaluation
from padim.reports import query_reports

pytest_plugins = ["tests.prefect_harness"]


@pytest.mark.data
@pytest.mark.slow
def test_evaluate_gives_the_scores_and_thresholds_of_train_and_score(
    prefect_harness: None, bottle_dir: Path, tmp_path: Path
) -> None:
    run = run_evaluation(bottle_dir)  # every default, as `padim evaluate DATASET`
    result = summarize(run)
    store = str(tmp_path / "store")
    trained = train(product="bottle", normal_url=str(bottle_dir / "train" / "good"), store=store)
    night = score(product="bottle", images_url=str(bottle_dir / "test"), store=store, date="2026-11-30")

    assert run.thresholds is not None
    assert trained["n_train"] == result.n_train and trained["n_calibration"] == result.n_holdout
    assert trained["image_threshold"] == pytest.approx(run.thresholds.image, rel=1e-5)
    assert trained["pixel_threshold"] == pytest.approx(run.thresholds.pixel, rel=1e-5)
    assert night["n_scored"] == len(run.test)
    rows = query_reports(store, product="bottle")
    reported = dict(zip(rows["image_uri"], rows["score"], strict=True))
    scores = np.array([reported[str(Path(image.uri))] for image in run.test])
    np.testing.assert_allclose(scores, run.scores, rtol=1e-5)
    flagged = dict(zip(rows["image_uri"], rows["is_anomaly"], strict=True))
    assert [flagged[str(Path(image.uri))] for image in run.test] == list(run.scores > run.thresholds.image)
    # The accuracy both describe: the default model on bottle (published PaDiM: 0.996-0.998 image AUROC).
    assert roc_auc_score(run.labels, scores) == pytest.approx(result.image_auroc, abs=1e-6)
    assert result.image_auroc >= 0.99 and result.pixel_auroc >= 0.95
