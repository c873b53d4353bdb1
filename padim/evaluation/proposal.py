"""Propose a product's setting for parts that may not be aligned, from its normal images alone.

Which remedy suits a product (issue 18; BENCHMARKS.md, "Parts that are not aligned") depends on the
product: on the shifted bottle augmented statistics win, on the magnetic tile every remedy loses
to plain PaDiM. A factory has normal images, not labelled defects, when it sets a product up, so
:func:`propose_setting` decides from the normal images alone:

1. It holds out a share of the normal images (the split ``padim train`` makes,
   :func:`padim.jobs.training.plan_training`).
2. From every held-out image it writes a *probe set*: the image itself, and copies with synthetic
   defects (:data:`PROBE_DEFECTS`): a painted scratch, spot or crack
   (:func:`padim.evaluation.synthetic.make_defect`), and a *misplaced patch* - a square of the
   image pasted elsewhere in it (CutPaste, Li et al., CVPR 2021). A misplaced patch is normal
   texture at the wrong place: a model that ignores position cannot see it, so the probe set also
   measures what a remedy gives up.
3. Every candidate setting (:data:`CANDIDATE_OVERRIDES`) is fitted on the rest of the images through
   the engine (:func:`padim.jobs.engine.fit_images`, the path training runs) and scores the probe
   set (:func:`padim.jobs.engine.score_images`). Its probe AUROC - held-out normal images against
   their defective copies - says how well it separates normal variation from defects.
4. The proposal is the first candidate, in the order of :data:`CANDIDATE_OVERRIDES` (plain PaDiM
   first, then the cheaper remedies), that the best one does not beat *significantly*: a paired
   bootstrap over the held-out images (each with its defective copies) must show the best one
   ahead by more than :attr:`~padim.settings.ProposalSettings.tie_tolerance` in at least
   :attr:`~padim.settings.ProposalSettings.confidence` of the rounds. A remedy must earn its place:
   on a probe set of a few dozen images, a lead of 0.005 can be chance.

How the proposals compare with the labelled test sets is measured by ``benchmarks/proposal.py``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from padim.core.alignment import with_reference
from padim.core.config import PadimConfig
from padim.core.fitter import build_model
from padim.core.preprocessing import compute_geometry
from padim.errors import ImageDecodeError, PadimError
from padim.evaluation.synthetic import make_defect
from padim.io.loading import load_pil
from padim.jobs.engine import fit_images, score_images
from padim.jobs.training import plan_training
from padim.settings import ProposalSettings, TrainSettings

__all__ = [
    "CANDIDATE_OVERRIDES",
    "PROBE_DEFECTS",
    "CandidateResult",
    "ProbeSet",
    "Proposal",
    "assess_candidate",
    "bootstrap_aurocs",
    "candidate_config",
    "choose_candidate",
    "make_probe_set",
    "misplace_patch",
    "propose_setting",
    "train_flags",
]

logger = logging.getLogger(__name__)

CANDIDATE_OVERRIDES: dict[str, dict[str, Any]] = {
    "plain": {},
    "neighbourhood3": {"neighbourhood": 3},
    "augment4": {"augment_copies": 4},
    "augment4_any": {"augment_copies": 4, "augment_rotation": 180.0},
    "shared": {"statistics": "shared"},
}
"""The settings a proposal chooses from, in order of preference on a tie (plain PaDiM first), as
overrides of the product's configuration. The names are :data:`padim.settings.RemedyCandidate`."""

PROBE_DEFECTS: tuple[str, ...] = ("scratch", "spot", "crack", "misplaced")
"""Synthetic defects of the probe set, dealt to the held-out images in turn."""

_FLAGS: dict[str, str] = {
    "statistics": "--statistics",
    "augment_copies": "--augment-copies",
    "augment_rotation": "--augment-rotation",
    "neighbourhood": "--neighbourhood",
}


@dataclass(frozen=True)
class ProbeSet:
    """Held-out normal images and their synthetic defective copies, written at the model's size.

    Attributes:
        uris: Every probe image: the normal copies first, then the defective ones.
        kinds: ``"good"`` or the synthetic defect of each image (see :data:`PROBE_DEFECTS`).
        groups: The held-out image each probe image was made from (its index in the hold-out).
        failed: Held-out images that could not be read (``(uri, error)``), left out.
    """

    uris: list[str]
    kinds: list[str]
    groups: list[int]
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        """1 for a defective probe, 0 for a normal one, shape ``(N,)``."""
        return np.array([kind != "good" for kind in self.kinds], dtype=np.int64)


@dataclass(frozen=True)
class CandidateResult:
    """How one candidate setting did on the probe set.

    Attributes:
        name: The candidate (a key of :data:`CANDIDATE_OVERRIDES`).
        overrides: Its configuration overrides.
        probe_auroc: AUROC of the held-out normal images against their defective copies.
        auroc_by_defect: The same per synthetic defect (normal images against that defect).
        normal_spread: ``(q95 - q50) / q50`` of the held-out normal images' scores: how tight
            the normal scores are (reported, not used in the choice).
        seconds: Wall time of fitting and scoring.
        scores: Image score of every probe image, in probe-set order.
    """

    name: str
    overrides: dict[str, Any]
    probe_auroc: float
    auroc_by_defect: dict[str, float]
    normal_spread: float
    seconds: float
    scores: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "name": self.name,
            "overrides": dict(self.overrides),
            "probe_auroc": self.probe_auroc,
            "auroc_by_defect": dict(self.auroc_by_defect),
            "normal_spread": self.normal_spread,
            "seconds": self.seconds,
            "scores": list(self.scores),
        }


@dataclass(frozen=True)
class Proposal:
    """The setting proposed for a product, with the evidence.

    Attributes:
        chosen: Name of the proposed candidate.
        overrides: Its configuration overrides (empty: plain PaDiM).
        results: Every candidate's result, in candidate order.
        n_fit: Normal images fitted by each candidate.
        n_probe: Probe images (normal plus defective).
        failed: Images that could not be read.
    """

    chosen: str
    overrides: dict[str, Any]
    results: list[CandidateResult]
    n_fit: int
    n_probe: int
    failed: list[tuple[str, str]]

    @property
    def flags(self) -> str:
        """The ``padim train`` options of the proposal (empty for plain PaDiM)."""
        return train_flags(self.overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "chosen": self.chosen,
            "overrides": dict(self.overrides),
            "flags": self.flags,
            "results": [result.to_dict() for result in self.results],
            "n_fit": self.n_fit,
            "n_probe": self.n_probe,
            "failed": [list(item) for item in self.failed],
        }


def train_flags(overrides: dict[str, Any]) -> str:
    """The ``padim train`` options that set configuration overrides.

    Args:
        overrides: Overrides of :class:`PadimConfig` fields (those of :data:`CANDIDATE_OVERRIDES`).

    Returns:
        For example ``"--augment-copies 4 --augment-rotation 180"``; empty for none.

    Raises:
        ValueError: For a field without a ``padim train`` option here.
    """
    parts = []
    for name, value in overrides.items():
        if name not in _FLAGS:
            raise ValueError(f"no padim train option for the configuration field {name!r}")
        text = f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(f"{_FLAGS[name]} {text}")
    return " ".join(parts)


def candidate_config(base: PadimConfig, name: str) -> PadimConfig:
    """The product's configuration with one candidate's overrides (validated).

    Args:
        base: The product's configuration (backbone, channels, image size...).
        name: A key of :data:`CANDIDATE_OVERRIDES`.

    Returns:
        The candidate's configuration.

    Raises:
        ValueError: For an unknown candidate.
    """
    if name not in CANDIDATE_OVERRIDES:
        raise ValueError(f"unknown candidate {name!r}; choose from {list(CANDIDATE_OVERRIDES)}")
    return PadimConfig(**{**base.model_dump(), **CANDIDATE_OVERRIDES[name]})


def misplace_patch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste a square of an image elsewhere in it (CutPaste): normal texture at the wrong place.

    Args:
        image: Float RGB image in ``[0, 1]``, shape ``(S, S, 3)``.
        rng: Random generator.

    Returns:
        ``(image with the patch, mask)``: float32 ``(S, S, 3)`` and ``uint8`` ``(S, S)``, 255 where
        the patch was pasted.

    Raises:
        ValueError: If the image is not square or smaller than 32 pixels.
    """
    if image.ndim != 3 or image.shape[0] != image.shape[1] or image.shape[0] < 32:
        raise ValueError(f"image must have shape (S, S, 3) with S >= 32, got {image.shape}")
    size = image.shape[0]
    side = int(rng.integers(max(4, size // 12), max(5, size // 6) + 1))
    low, high = size // 8, size - size // 8 - side  # keep the pasted square off the border
    source = rng.integers(0, size - side + 1, size=2)
    for _ in range(100):  # a target far enough from the source that the texture is out of place
        target = rng.integers(low, high + 1, size=2)
        if np.abs(target - source).max() >= 2 * side:
            break
    out = image.astype(np.float32, copy=True)
    out[target[0] : target[0] + side, target[1] : target[1] + side] = image[
        source[0] : source[0] + side, source[1] : source[1] + side
    ]
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[target[0] : target[0] + side, target[1] : target[1] + side] = 255
    return out, mask


def _defective_copy(
    pixels: np.ndarray, box: tuple[int, int, int, int], kind: str, rng: np.random.Generator
) -> np.ndarray:
    """A defect of ``kind`` inside the model's input square ``box`` of a resized image ``(H, W, 3)``."""
    left, top, right, bottom = box
    square = pixels[top:bottom, left:right].astype(np.float32) / 255.0
    if kind == "misplaced":
        defective, _ = misplace_patch(square, rng)
    else:
        defective, _ = make_defect(square, kind, rng)
    out = pixels.copy()
    out[top:bottom, left:right] = np.rint(np.clip(defective, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def make_probe_set(
    holdout: Sequence[str], config: PadimConfig, folder: Path, defects_per_image: int, seed: int
) -> ProbeSet:
    """Write the held-out normal images and synthetic defective copies of them as PNG files.

    Every image is written at the size the model resizes it to (``compute_geometry(...).resized``),
    normal and defective alike, so re-reading it changes nothing, and each defect lies inside the
    square the model inspects.

    Args:
        holdout: Held-out normal images.
        config: The product's configuration (its resize and crop).
        folder: Where to write (a fresh folder).
        defects_per_image: Defective copies per held-out image.
        seed: Seed of the defects.

    Returns:
        The probe set (normal images first).

    Raises:
        PadimError: If fewer than two held-out images can be read.
        ImageReadError: Storage could not deliver an image (after retries).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    normal: list[tuple[str, int]] = []
    defective: list[tuple[str, str, int]] = []
    failed: list[tuple[str, str]] = []
    for index, uri in enumerate(holdout):
        try:
            image = load_pil(uri).convert("RGB")
        except ImageDecodeError as exc:  # a bad file is reported and left out; a storage fault is raised
            failed.append((uri, str(exc)))
            continue
        geometry = compute_geometry(image.width, image.height, config)
        pixels = np.asarray(image.resize(geometry.resized, Image.Resampling.BILINEAR, reducing_gap=None))
        path = folder / f"normal_{index:05d}.png"
        Image.fromarray(pixels).save(path)
        normal.append((str(path), index))
        for copy in range(defects_per_image):
            kind = PROBE_DEFECTS[(index * defects_per_image + copy) % len(PROBE_DEFECTS)]
            path = folder / f"{kind}_{index:05d}_{copy}.png"
            Image.fromarray(_defective_copy(pixels, geometry.crop_box, kind, rng)).save(path)
            defective.append((str(path), kind, index))
    if len(normal) < 2:
        raise PadimError(f"only {len(normal)} held-out normal images could be read; a proposal needs at least 2")
    return ProbeSet(
        uris=[uri for uri, _ in normal] + [uri for uri, _, _ in defective],
        kinds=["good"] * len(normal) + [kind for _, kind, _ in defective],
        groups=[group for _, group in normal] + [group for _, _, group in defective],
        failed=failed,
    )


def assess_candidate(
    name: str, config: PadimConfig, fit_uris: Sequence[str], probe: ProbeSet, settings: TrainSettings
) -> CandidateResult:
    """Fit one candidate on the fit images and score the probe set with it.

    Args:
        name: The candidate's name.
        config: The candidate's configuration.
        fit_uris: Normal images to fit on.
        probe: The probe set.
        settings: Batch size, device and compute path (as training uses them).

    Returns:
        The candidate's probe AUROC (overall and per synthetic defect) and normal-score spread.

    Raises:
        PadimError: If no image could be fitted or a probe image could not be scored.
    """
    start = time.perf_counter()
    config = with_reference(config, fit_uris[0] if fit_uris else None)
    fitted = fit_images(
        fit_uris,
        config,
        batch_size=settings.batch_size,
        device=settings.device,
        **settings.execution,
        description=f"fit {name}",
    )
    if not fitted.fitted:
        raise PadimError(f"candidate {name}: none of the {len(fit_uris)} normal images could be fitted")
    model = build_model(
        config,
        fitted.accumulator,
        weights_sha256=fitted.weights_sha256,
        keep_statistics=False,
        **settings.execution,
        reference=fitted.reference,
    )
    scores = np.empty(len(probe.uris), dtype=np.float64)
    scored = score_images(
        model, probe.uris, batch_size=settings.batch_size, keep_maps="none", description=f"probe {name}"
    )
    for row, result in enumerate(scored):
        if not result.ok or result.score is None:
            raise PadimError(f"candidate {name}: probe image {result.record.uri} failed: {result.record.error}")
        scores[row] = result.score
    labels, kinds = probe.labels, np.array(probe.kinds)
    by_defect = {}
    for kind in PROBE_DEFECTS:
        chosen = (kinds == kind) | (labels == 0)
        if (kinds == kind).any():
            by_defect[kind] = float(roc_auc_score(labels[chosen], scores[chosen]))
    normal = scores[labels == 0]
    median = float(np.median(normal))
    return CandidateResult(
        name=name,
        overrides=dict(CANDIDATE_OVERRIDES.get(name, {})),
        probe_auroc=float(roc_auc_score(labels, scores)),
        auroc_by_defect=by_defect,
        normal_spread=float((np.quantile(normal, 0.95) - median) / median) if median > 0 else float("nan"),
        seconds=time.perf_counter() - start,
        scores=scores.tolist(),
    )


def bootstrap_aurocs(
    results: Sequence[CandidateResult], labels: np.ndarray, groups: np.ndarray, rounds: int, seed: int
) -> np.ndarray:
    """Probe AUROC of every candidate on the same resamples of the held-out images.

    Each round draws held-out images with replacement and keeps every probe made from them (the
    image and its defective copies), so the candidates are compared on identical samples.

    Args:
        results: Candidate results with their probe scores.
        labels: 1 for a defective probe, shape ``(N,)``.
        groups: Held-out image of each probe, shape ``(N,)``.
        rounds: Bootstrap rounds.
        seed: Seed of the resampling.

    Returns:
        Shape ``(rounds, len(results))``.
    """
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(groups == group) for group in np.unique(groups)]
    scores = np.array([result.scores for result in results], dtype=np.float64)  # (C, N)
    out = np.empty((rounds, len(results)), dtype=np.float64)
    for row in range(rounds):
        drawn = rng.integers(0, len(members), size=len(members))
        index = np.concatenate([members[group] for group in drawn])
        sample = labels[index]
        for column in range(len(results)):
            out[row, column] = roc_auc_score(sample, scores[column, index])
    return out


def choose_candidate(
    results: Sequence[CandidateResult],
    labels: np.ndarray,
    groups: np.ndarray,
    settings: ProposalSettings,
) -> CandidateResult:
    """The first candidate that the best one does not beat significantly.

    The best is the candidate of the highest probe AUROC. An earlier candidate is kept unless the
    best one leads it by more than ``settings.tie_tolerance`` in at least ``settings.confidence``
    of the paired bootstrap rounds (:func:`bootstrap_aurocs`).

    Args:
        results: Candidate results with their probe scores, in order of preference.
        labels: 1 for a defective probe, shape ``(N,)``.
        groups: Held-out image of each probe, shape ``(N,)``.
        settings: Tie tolerance, confidence, bootstrap rounds and seed.

    Returns:
        The chosen result.

    Raises:
        ValueError: If there are no results or their scores do not match the labels.
    """
    if not results:
        raise ValueError("no candidate results to choose from")
    if any(len(result.scores) != len(labels) for result in results) or len(groups) != len(labels):
        raise ValueError("every candidate needs one score per probe image, and every probe image a group")
    best = int(np.argmax([result.probe_auroc for result in results]))
    rounds = bootstrap_aurocs(results, labels, groups, settings.bootstrap_rounds, settings.seed)
    for column, result in enumerate(results):
        lead = rounds[:, best] - rounds[:, column]
        if column == best or float(np.mean(lead > settings.tie_tolerance)) < settings.confidence:
            return result
    return results[best]  # not reached: the best is never beaten by itself


def propose_setting(
    uris: Sequence[str],
    base: PadimConfig | None = None,
    train_settings: TrainSettings | None = None,
    settings: ProposalSettings | None = None,
    workdir: Path | None = None,
) -> Proposal:
    """Propose a product's setting for parts that may not be aligned, from normal images alone.

    Args:
        uris: The product's normal images (what ``padim train`` would fit).
        base: The product's configuration; each candidate overrides its remedy options
            (default :class:`PadimConfig()`).
        train_settings: The hold-out split, batch size, device and compute path (default
            :class:`TrainSettings()`, what ``padim train`` uses).
        settings: Candidates, defects per held-out image, tie tolerance, seed (default
            :class:`ProposalSettings()`).
        workdir: Where to write the probe images (default: a temporary folder, removed after).

    Returns:
        The proposal and every candidate's result.

    Raises:
        PadimError: If there are too few normal images to hold some out, or a candidate fails.
    """
    base = base or PadimConfig()
    train_settings = train_settings or TrainSettings()
    settings = settings or ProposalSettings()
    plan = plan_training(list(uris), train_settings)
    fit_uris = [uri for shard in plan.fit_shards for uri in shard]
    with tempfile.TemporaryDirectory(prefix="padim-probe-", dir=workdir) as folder:
        probe = make_probe_set(plan.holdout, base, Path(folder), settings.defects_per_image, settings.seed)
        results = []
        for name in settings.candidates:
            result = assess_candidate(name, candidate_config(base, name), fit_uris, probe, train_settings)
            logger.info("candidate %s: probe AUROC %.4f (%.0f s)", name, result.probe_auroc, result.seconds)
            results.append(result)
    chosen = choose_candidate(results, probe.labels, np.asarray(probe.groups), settings)
    return Proposal(
        chosen=chosen.name,
        overrides=dict(chosen.overrides),
        results=results,
        n_fit=len(fit_uris),
        n_probe=len(probe.uris),
        failed=probe.failed,
    )
