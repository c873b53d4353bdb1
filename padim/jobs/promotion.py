"""The promotion gate: whether a retrained model version may replace the one in use.

A retrain publishes its version as a *candidate* (:meth:`padim.io.store.ModelStore.publish` with
``promote=False``). :func:`check_candidate` then compares it with the version in use on

* the product's **calibration pool**: the held-out normal images of every training batch so far
  (``<store>/<product>/calibration-pool.json``: URI and sha256 per image, grown by
  :func:`grow_pool` after each train and retrain, written atomically);
* the product's **reference defects**: images of known defects (``reference_defects_url`` in
  ``product.json``; optional).

The candidate passes when (a) its image threshold moved by less than
:attr:`~padim.settings.GateSettings.max_threshold_change` (relative) from the version in use,
(b) its false-alarm rate on the pool is at most its target image FPR plus
:attr:`~padim.settings.GateSettings.fpr_tolerance`, and (c) it flags every reference defect the
version in use flags. The decision itself is :func:`decide`, a pure function of the scores.

Pool images were held out when their own batch was calibrated, then merged into the statistics
(no good image is wasted); so the candidate has them in its Gaussians, and its own scores of them
are in-sample (lower than those of unseen good images). Check (b) is therefore made *out of
sample* (:func:`score_pool`): the pool images that are in the candidate's statistics (its
``training_images``, matched by sha256) are embedded again, one batch (the images held out for one
version) at a time; the batch's statistics are removed from the candidate's
(:meth:`padim.core.statistics.GaussianAccumulator.subtract`, the exact inverse of the merge) and a
*leave-batch-out* model with the candidate's thresholds scores them. Pool images not in its
statistics are scored by the candidate itself. When a batch cannot be removed exactly (the
candidate's statistics hold random augmented copies, ``augment_copies > 0``, or fewer than two
images would remain) its images are scored in sample, an undercount, and the decision says so
(:attr:`GateDecision.pool_fallback`, a note). Checks (a) and (c) judge the candidate itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from padim.jobs.calibration_pool import PoolImage, score_pool
from padim.settings import GateSettings

__all__ = [
    "GateDecision",
    "check_candidate",
    "decide",
    "describe",
]


@dataclass
class GateDecision:
    """The outcome of the promotion gate for a candidate.

    Attributes:
        passed: Every check passed: the candidate may become the version in use.
        reasons: Why it did not pass, one sentence per failed check.
        notes: Checks that could not be judged (e.g. too few pool images), in words.
        candidate_threshold: The candidate's image threshold.
        in_use_threshold: The image threshold of the version in use.
        threshold_change: ``|candidate - in use| / in use``.
        pool_images: Pool images scored.
        pool_false_alarms: Pool images above the candidate's threshold, counted out of sample
            where possible (see :func:`score_pool`).
        max_pool_fpr: The bound on ``pool_false_alarms / pool_images``.
        pool_left_out: Of the pool images, those in the candidate's statistics that a
            leave-batch-out model scored (out of sample).
        pool_in_sample: Of the pool images, those in the candidate's statistics that the candidate
            itself scored (in sample, an undercount): all of them when the check fell back.
        pool_fallback: Why the check fell back to in-sample scores (``""``: it did not).
        pool_false_alarms_in_sample: Pool images the candidate itself flags (its in-sample
            count, for comparison with ``pool_false_alarms``).
        defects: Reference defects scored by both versions.
        defects_flagged_in_use: Of them, flagged by the version in use.
        defects_missed: Reference defects the version in use flags and the candidate misses.
    """

    passed: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    candidate_threshold: float = math.nan
    in_use_threshold: float = math.nan
    threshold_change: float = math.nan
    pool_images: int = 0
    pool_false_alarms: int = 0
    max_pool_fpr: float = math.nan
    pool_left_out: int = 0
    pool_in_sample: int = 0
    pool_fallback: str = ""
    pool_false_alarms_in_sample: int = 0
    defects: int = 0
    defects_flagged_in_use: int = 0
    defects_missed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields (NaN becomes ``None``)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def decide(
    candidate_threshold: float,
    in_use_threshold: float,
    image_fpr: float,
    pool_scores: Sequence[float],
    defects: Sequence[tuple[str, float, float]],
    settings: GateSettings,
    calibrated_on: int | None = None,
) -> GateDecision:
    """Apply the gate's three checks to scores already computed.

    Args:
        candidate_threshold: The candidate's image threshold.
        in_use_threshold: The image threshold of the version in use.
        image_fpr: The candidate's target false-positive rate.
        pool_scores: Image scores of the pool's normal images as the false alarms are counted
            (out of sample where possible, see :func:`score_pool`).
        defects: ``(uri, score by the version in use, score by the candidate)`` per reference defect.
        settings: The bounds.
        calibrated_on: Number of held-out images the candidate's threshold was set on. A
            threshold at a target FPR ``p`` from ``n`` scores cannot resolve rates below
            ``1 / (n + 1)`` (at ``p = 1 %`` and ``n < 100`` it is the largest score), so about that
            share of unseen good images lies above it: the false-alarm bound is
            ``max(p, 1 / (n + 1)) + fpr_tolerance``. ``None``: ``p + fpr_tolerance``.

    Returns:
        The decision, with a reason per failed check.

    Raises:
        ValueError: A threshold is not a positive finite number.
    """
    for name, value in (("candidate", candidate_threshold), ("in-use", in_use_threshold)):
        if not math.isfinite(value) or value <= 0.0:
            raise ValueError(f"the {name} image threshold must be a positive number, got {value}")
    decision = GateDecision(passed=True, candidate_threshold=candidate_threshold, in_use_threshold=in_use_threshold)
    decision.threshold_change = abs(candidate_threshold - in_use_threshold) / in_use_threshold
    if decision.threshold_change >= settings.max_threshold_change:
        decision.reasons.append(
            f"the image threshold moved by {decision.threshold_change:.1%} ({in_use_threshold:.4g} -> "
            f"{candidate_threshold:.4g}), the bound is {settings.max_threshold_change:.1%} (max_threshold_change)"
        )
    decision.pool_images = len(pool_scores)
    decision.pool_false_alarms = sum(1 for s in pool_scores if s > candidate_threshold)
    achievable = max(image_fpr, 1.0 / (calibrated_on + 1)) if calibrated_on else image_fpr
    decision.max_pool_fpr = achievable + settings.fpr_tolerance
    if decision.pool_images < settings.min_pool_images:
        decision.notes.append(
            f"false alarms not judged: {decision.pool_images} readable pool image(s), fewer than "
            f"{settings.min_pool_images} (min_pool_images)"
        )
    elif decision.pool_false_alarms / decision.pool_images > decision.max_pool_fpr:
        decision.reasons.append(
            f"it flags {decision.pool_false_alarms} of {decision.pool_images} normal images of the calibration pool "
            f"({decision.pool_false_alarms / decision.pool_images:.1%}), more than "
            + (
                f"the target {image_fpr:.1%}"
                if achievable == image_fpr
                else f"{achievable:.1%} (1 / (n + 1): its threshold was set on {calibrated_on} images)"
            )
            + f" + {settings.fpr_tolerance:.1%} (fpr_tolerance)"
        )
    decision.defects = len(defects)
    flagged_before = [(uri, new) for uri, old, new in defects if old > in_use_threshold]
    decision.defects_flagged_in_use = len(flagged_before)
    decision.defects_missed = [uri for uri, new in flagged_before if not new > candidate_threshold]
    if decision.defects_missed:
        decision.reasons.append(
            f"it misses {len(decision.defects_missed)} of the {len(flagged_before)} reference defects the version "
            f"in use flags (first: {decision.defects_missed[0]})"
        )
    decision.passed = not decision.reasons
    return decision


def check_candidate(
    candidate: Any,
    in_use: Any,
    pool: Sequence[PoolImage],
    defect_uris: Sequence[str],
    settings: GateSettings,
    batch_size: int | None = None,
) -> GateDecision:
    """Score the pool and the reference defects and decide whether the candidate may be used.

    The pool's false alarms are counted out of sample where possible (:func:`score_pool`); the
    threshold move and the reference defects are judged on the candidate itself. Pool images that
    cannot be read, or whose content changed since they were held out, are left out (the decision
    says how many images it judged).

    Args:
        candidate: The candidate model (:class:`padim.core.model.PadimModel`, calibrated), loaded
            with its statistics (``with_statistics=True``) for the out-of-sample check; without
            them the check falls back to in-sample scores and says so.
        in_use: The model of the version in use (calibrated).
        pool: The calibration pool.
        defect_uris: The product's reference defect images (may be empty).
        settings: The bounds.
        batch_size: Images per backbone batch; ``None`` fits the device.

    Returns:
        The decision.
    """
    from padim.jobs.engine import score_images  # torch: imported only when a gate runs

    if candidate.thresholds is None or in_use.thresholds is None:
        raise ValueError("both model versions need calibrated thresholds for the promotion gate")
    pool_scores = score_pool(candidate, pool, batch_size=batch_size)
    defects: list[tuple[str, float, float]] = []
    if defect_uris:
        old = {
            s.record.uri: s.score
            for s in score_images(in_use, list(defect_uris), batch_size=batch_size, keep_maps="none")
        }
        new = {
            s.record.uri: s.score
            for s in score_images(candidate, list(defect_uris), batch_size=batch_size, keep_maps="none")
        }
        defects = [
            (u, float(old[u]), float(new[u])) for u in defect_uris if old.get(u) is not None and new.get(u) is not None
        ]
    decision = decide(
        candidate.thresholds.image,
        in_use.thresholds.image,
        candidate.thresholds.image_fpr,
        list(pool_scores.scores.values()),
        defects,
        settings,
        calibrated_on=candidate.thresholds.n_images,
    )
    threshold = candidate.thresholds.image
    inside = set(pool_scores.in_statistics)
    decision.pool_left_out = len(pool_scores.left_out)
    decision.pool_in_sample = sum(1 for u in pool_scores.scores if u in inside) - decision.pool_left_out
    decision.pool_fallback = pool_scores.fallback
    decision.pool_false_alarms_in_sample = sum(1 for u in pool_scores.scores if pool_scores.in_sample[u] > threshold)
    if pool_scores.fallback:
        decision.notes.append(
            f"false alarms counted in sample on the {decision.pool_in_sample} pool image(s) in the candidate's "
            f"statistics (an undercount): {pool_scores.fallback}"
        )
    if pool_scores.skipped:
        decision.notes.append(
            f"{pool_scores.skipped} pool image(s) left out: unreadable or changed since they were held out"
        )
    return decision


def describe(decision: GateDecision) -> str:
    """One line about a decision, for logs and the candidate record."""
    verdict = "passed" if decision.passed else "rejected: " + "; ".join(decision.reasons)
    figures = (
        f"threshold {decision.in_use_threshold:.4g} -> {decision.candidate_threshold:.4g}, "
        f"{decision.pool_false_alarms}/{decision.pool_images} pool false alarms{pool_scoring(decision)}, "
        f"{decision.defects_flagged_in_use - len(decision.defects_missed)}/{decision.defects_flagged_in_use} "
        "reference defects still flagged"
    )
    return f"{verdict} ({figures})"


def pool_scoring(decision: GateDecision) -> str:
    """How the pool's false alarms were counted, in words (``""`` when no pool image is in the statistics)."""
    if decision.pool_in_sample:
        return f" ({decision.pool_in_sample} in sample)"
    if decision.pool_left_out:
        return f" (out of sample; {decision.pool_false_alarms_in_sample} in sample)"
    return ""
