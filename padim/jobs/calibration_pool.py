"""The calibration pool of a product, and its images scored out of sample.

The pool is every held-out good image of every training batch so far (``calibration-pool.json`` in
the store, grown by each train and retrain). The pool's images were merged into the statistics
after calibrating their batch, so :func:`score_pool` scores each batch with the model of the
candidate's statistics without that batch (an exact downdate,
:meth:`~padim.core.statistics.GaussianAccumulator.subtract`): the scores of a model fitted without
it, which the promotion gate counts false alarms on.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from padim.errors import PadimError, StoreError
from padim.io.fsio import read_bytes, write_bytes_atomic
from padim.io.store import ModelStore
from padim.io.store_layout import validate_product

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
