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

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from padim.errors import PadimError, StoreError
from padim.io.fsio import read_bytes, write_bytes_atomic
from padim.io.store import ModelStore
from padim.io.store_layout import validate_product
from padim.settings import GateSettings

__all__ = [
    "POOL_FILE",
    "GateDecision",
    "PoolImage",
    "PoolScores",
    "check_candidate",
    "decide",
    "describe",
    "grow_pool",
    "pool_url",
    "read_pool",
    "score_pool",
]

POOL_FILE = "calibration-pool.json"


@dataclass(frozen=True)
class PoolImage:
    """One normal image of a product's calibration pool.

    Attributes:
        uri: Where the image is.
        sha256: Its content hash when it was held out (an image rewritten since is left out).
        version: The model version whose calibration it was held out for.
        added_at: When it joined the pool (ISO 8601 UTC).
    """

    uri: str
    sha256: str
    version: str = ""
    added_at: str = ""


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


# ---- the pool -------------------------------------------------------------------------------------


def pool_url(store: ModelStore, product: str) -> str:
    """URL of a product's calibration pool: ``<store>/<product>/calibration-pool.json``."""
    return store.artifact_url(validate_product(product), POOL_FILE)


def read_pool(store: ModelStore, product: str) -> list[PoolImage]:
    """Read a product's calibration pool (``[]`` when none was written yet).

    Args:
        store: Model store.
        product: Product name.

    Returns:
        The pool images, oldest first.

    Raises:
        StoreError: The file exists but is not a valid pool.
    """
    url = pool_url(store, product)
    try:
        raw = read_bytes(url)
    except FileNotFoundError:
        return []
    try:
        payload = json.loads(raw)
        return [PoolImage(**entry) for entry in payload["images"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"calibration pool {url} is corrupt ({exc}); delete it to start a new pool") from exc


def grow_pool(store: ModelStore, product: str, images: Sequence[tuple[str, str]], version: str = "") -> list[PoolImage]:
    """Add held-out normal images to a product's calibration pool (atomic rewrite, no duplicates).

    Args:
        store: Model store.
        product: Product name.
        images: ``(uri, sha256)`` of held-out normal images; pairs already in the pool are kept
            as they are.
        version: The model version they were held out for.

    Returns:
        The whole pool after the addition.
    """
    pool = read_pool(store, product)
    known = {(p.uri, p.sha256) for p in pool}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    added = [PoolImage(uri, sha, version, now) for uri, sha in dict.fromkeys(images) if (uri, sha) not in known]
    if added:
        pool = pool + added
        payload = {"product": product, "images": [asdict(p) for p in pool]}
        write_bytes_atomic(pool_url(store, product), (json.dumps(payload, indent=1) + "\n").encode("utf-8"))
    return pool


# ---- the decision ---------------------------------------------------------------------------------


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


@dataclass
class PoolScores:
    """The image scores of the calibration pool on which the gate counts false alarms.

    Attributes:
        scores: ``uri -> score`` of every scored pool image as the false alarms are counted: by
            the leave-batch-out models for the images in the candidate's statistics (unless the
            check fell back), by the candidate for the others.
        in_sample: ``uri -> score`` by the candidate itself, for every scored pool image.
        left_out: The images scored by a leave-batch-out model (out of sample).
        in_statistics: The images in the candidate's statistics (whether removed or not).
        fallback: Why some images in the candidate's statistics were scored in sample, one
            reason per kind joined by ``"; "`` (``""``: none were).
        skipped: Pool images not scored: unreadable, or changed since they were held out.
    """

    scores: dict[str, float] = field(default_factory=dict)
    in_sample: dict[str, float] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    in_statistics: list[str] = field(default_factory=list)
    fallback: str = ""
    skipped: int = 0


def pool_in_statistics(training_images: Sequence[tuple[str, str]], pool: dict[str, str]) -> list[str]:
    """The pool images whose content is in a model's statistics, matched by sha256.

    A content counted ``k`` times among the training images matches at most ``k`` pool images, so
    no image is removed more often than it was added.

    Args:
        training_images: ``(uri, sha256)`` of every image in the statistics.
        pool: ``uri -> sha256`` of the pool images.

    Returns:
        Their URIs, in pool order.
    """
    counts = Counter(sha for _, sha in training_images if sha)
    matched = []
    for uri, sha in pool.items():
        if sha and counts[sha] > 0:
            counts[sha] -= 1
            matched.append(uri)
    return matched


def leave_out_refusal(candidate: Any, n_remove: int) -> str:
    """Why ``n_remove`` pool images cannot be removed exactly from a candidate's statistics (``""``: they can)."""
    if candidate.config.augment_copies > 0:
        return (
            f"its statistics hold {candidate.config.augment_copies} random augmented copies of every training "
            "image (augment_copies), which cannot be removed exactly"
        )
    if candidate.accumulator is None:
        return "the candidate was loaded without its statistics"
    if candidate.accumulator.n - n_remove < 2:
        return (
            f"removing the {n_remove} pool images would leave {candidate.accumulator.n - n_remove} image(s) "
            "in its statistics, fewer than 2"
        )
    return ""


def score_pool(candidate: Any, pool: Sequence[PoolImage], batch_size: int | None = None) -> PoolScores:
    """Score the calibration pool for the false-alarm check, out of sample where possible.

    The pool images in the candidate's statistics (:func:`pool_in_statistics`) are scored one
    *batch* at a time (the images held out for one version, :attr:`PoolImage.version`): the
    candidate scores the batch and, on the same backbone pass, its images are embedded into a
    fitter with the candidate's configuration, channel reduction, registration reference and
    compute settings (the pass that folded them in at calibration, :func:`padim.jobs.engine.calibrate`).
    Their statistics are removed from a copy of the candidate's
    (:meth:`~padim.core.statistics.GaussianAccumulator.subtract`) and the remaining ones are
    finalised (:func:`padim.core.fitter.build_model`) into a *leave-batch-out* model with the
    candidate's thresholds, which scores the batch again: the scores of a model fitted on the
    candidate's training images without that batch (up to float rounding). For the candidate's own
    batch that is the model its threshold was calibrated with. Removing one batch at a time, not
    the whole pool, keeps the scoring model close to the candidate: the pool grows with every
    retrain, and a model without all of it would be fitted on far fewer images than the candidate
    and would overcount false alarms. The other pool images are scored by the candidate. Memory:
    the candidate's statistics twice and one batch's once, ``O(P d^2)`` each; time: one
    finalisation per batch.

    A batch falls back to the candidate's in-sample scores (and ``fallback`` says why) when its
    images cannot be removed exactly: augmented copies in the statistics (``augment_copies > 0``),
    no statistics loaded, fewer than two images left, or statistics that do not contain the
    images as embedded now.

    Args:
        candidate: The candidate model (calibrated), with its statistics
            (``load_model(..., with_statistics=True)``); its own statistics are not changed.
        pool: The calibration pool.
        batch_size: Images per backbone batch; ``None`` fits the device.

    Returns:
        The scores.
    """
    # torch: imported only when a gate runs
    from padim.core.fitter import PadimFitter, build_model
    from padim.jobs.engine import score_images

    expected = {p.uri: p.sha256 for p in pool}
    held_out_for = {p.uri: p.version for p in pool}

    def changed(uri: str, sha256: str) -> bool:
        return bool(expected[uri]) and sha256 != expected[uri]

    def score(model: Any, uris: list[str], fold_into: Any = None) -> dict[str, float]:
        scored = score_images(
            model, uris, batch_size=batch_size, keep_maps="none", skip=changed, fold_into=fold_into, description="gate"
        )
        return {s.record.uri: float(s.score) for s in scored if s.ok and s.score is not None}

    result = PoolScores(in_statistics=pool_in_statistics(candidate.training.training_images, expected))
    batches: dict[str, list[str]] = {}
    for uri in result.in_statistics:
        batches.setdefault(held_out_for[uri], []).append(uri)
    fallbacks: list[str] = []
    for uris in batches.values():
        reason = leave_out_refusal(candidate, len(uris))
        fitter = None
        if not reason:
            fitter = PadimFitter(
                candidate.config,
                device=candidate.accumulator.device,
                projector=candidate.projector,
                path=candidate.path,
                runtime=candidate.runtime,
                precision=candidate.precision,
                reference=candidate.reference,
            )
        in_sample = score(candidate, uris, fitter)
        result.in_sample.update(in_sample)
        result.scores.update(in_sample)
        if fitter is not None:
            fitter.flush()
            try:
                remaining = candidate.accumulator.copy().subtract(fitter.accumulator)
                leave_out = build_model(
                    fitter,
                    remaining,
                    weights_sha256=candidate.weights_sha256,
                    thresholds=candidate.thresholds,
                    keep_statistics=False,
                    path=candidate.path,
                    runtime=candidate.runtime,
                    precision=candidate.precision,
                    reference=candidate.reference,
                )
            except (ValueError, PadimError) as exc:
                reason = f"its images could not be removed from the statistics ({exc})"
            else:
                del remaining, fitter
                out_of_sample = score(leave_out, [u for u in uris if u in in_sample])
                for uri in in_sample:  # one unreadable since the first pass is left out
                    if uri in out_of_sample:
                        result.scores[uri] = out_of_sample[uri]
                        result.left_out.append(uri)
                    else:
                        del result.scores[uri]
                del leave_out
        if reason and reason not in fallbacks:
            fallbacks.append(reason)
    inside = set(result.in_statistics)
    others = score(candidate, [u for u in expected if u not in inside])
    result.in_sample.update(others)
    result.scores.update(others)
    result.fallback = "; ".join(fallbacks)
    result.skipped = len(expected) - len(result.scores)
    return result


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
