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
(no good image is wasted); so for every later model they are training images, and their scores
are lower than those of unseen good images. Check (b) is therefore a lower bound on the false
alarms of new good images: it catches a threshold that fell below the bulk of good scores, while
check (a) catches a threshold that jumped either way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from padim.errors import StoreError
from padim.io.fsio import read_bytes, write_bytes_atomic
from padim.io.store import ModelStore
from padim.io.store_layout import validate_product
from padim.settings import GateSettings

__all__ = [
    "POOL_FILE",
    "GateDecision",
    "PoolImage",
    "check_candidate",
    "decide",
    "describe",
    "grow_pool",
    "pool_url",
    "read_pool",
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
        pool_false_alarms: Pool images the candidate flags.
        max_pool_fpr: The bound on ``pool_false_alarms / pool_images``.
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
) -> GateDecision:
    """Apply the gate's three checks to scores already computed.

    Args:
        candidate_threshold: The candidate's image threshold.
        in_use_threshold: The image threshold of the version in use.
        image_fpr: The candidate's target false-positive rate.
        pool_scores: The candidate's image scores of the pool's normal images.
        defects: ``(uri, score by the version in use, score by the candidate)`` per reference defect.
        settings: The bounds.

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
    decision.max_pool_fpr = image_fpr + settings.fpr_tolerance
    if decision.pool_images < settings.min_pool_images:
        decision.notes.append(
            f"false alarms not judged: {decision.pool_images} readable pool image(s), fewer than "
            f"{settings.min_pool_images} (min_pool_images)"
        )
    elif decision.pool_false_alarms / decision.pool_images > decision.max_pool_fpr:
        decision.reasons.append(
            f"it flags {decision.pool_false_alarms} of {decision.pool_images} normal images of the calibration pool "
            f"({decision.pool_false_alarms / decision.pool_images:.1%}), more than the target {image_fpr:.1%} "
            f"+ {settings.fpr_tolerance:.1%} (fpr_tolerance)"
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

    Pool images that cannot be read, or whose content changed since they were held out, are left
    out (the decision says how many images it judged).

    Args:
        candidate: The candidate model (:class:`padim.core.model.PadimModel`, calibrated).
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
    expected = {p.uri: p.sha256 for p in pool}
    pool_scores = [
        float(s.score)
        for s in score_images(candidate, list(expected), batch_size=batch_size, keep_maps="none", description="gate")
        if s.ok and s.score is not None and (not expected[s.record.uri] or s.record.sha256 == expected[s.record.uri])
    ]
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
        pool_scores,
        defects,
        settings,
    )
    skipped = len(expected) - len(pool_scores)
    if skipped:
        decision.notes.append(f"{skipped} pool image(s) left out: unreadable or changed since they were held out")
    return decision


def describe(decision: GateDecision) -> str:
    """One line about a decision, for logs and the candidate record."""
    verdict = "passed" if decision.passed else "rejected: " + "; ".join(decision.reasons)
    figures = (
        f"threshold {decision.in_use_threshold:.4g} -> {decision.candidate_threshold:.4g}, "
        f"{decision.pool_false_alarms}/{decision.pool_images} pool false alarms, "
        f"{decision.defects_flagged_in_use - len(decision.defects_missed)}/{decision.defects_flagged_in_use} "
        "reference defects still flagged"
    )
    return f"{verdict} ({figures})"
