"""``padim propose``: the setting of a product proposed from its normal images alone (issue 18).

The probe set (held-out images written at the model's size, synthetic defects inside the inspected
square, a misplaced patch that is the image's own texture), the choice rule, and a hand-built product
with a known answer: a part whose halves differ, where position matters, so plain PaDiM must win even
when listed last. Which setting wins on real data, shifted or not, is ``benchmarks/proposal.py``'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from padim.core.config import PadimConfig
from padim.core.preprocessing import Preprocessor
from padim.evaluation.proposal import (
    CANDIDATE_OVERRIDES,
    PROBE_DEFECTS,
    CandidateResult,
    bootstrap_aurocs,
    candidate_config,
    choose_candidate,
    make_probe_set,
    misplace_patch,
    propose_setting,
    train_flags,
)
from padim.settings import ProposalSettings, RemedyCandidate, TrainSettings

SIDE = 64
BASE = PadimConfig(backbone="resnet18", weights="random", image_size=SIDE, channels=16)
FAST = TrainSettings(batch_size=16, runtime="torch")


def write_images(folder: Path, images: list[np.ndarray]) -> list[str]:
    """Write gray ``uint8`` images as PNG files; their paths, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:03d}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def halves(n: int, seed: int) -> list[np.ndarray]:
    """A part whose left half is dark and right half bright, always at the same place."""
    rng = np.random.default_rng(seed)
    base = np.where(np.arange(SIDE)[None, :] < SIDE // 2, 60.0, 190.0) * np.ones((SIDE, 1))
    return [np.clip(base + rng.normal(0, 6, (SIDE, SIDE)), 0, 255).astype(np.uint8) for _ in range(n)]


# --- the catalogue and the rule ----------------------------------------------------------------


def test_the_candidates_are_the_settings_literal_in_order_and_each_is_a_valid_configuration() -> None:
    assert tuple(CANDIDATE_OVERRIDES) == get_args(RemedyCandidate) == ProposalSettings().candidates
    assert CANDIDATE_OVERRIDES["plain"] == {}
    for name in CANDIDATE_OVERRIDES:
        config = candidate_config(BASE, name)
        assert config.remedies() == CANDIDATE_OVERRIDES[name]
        assert (config.backbone, config.image_size, config.channels) == ("resnet18", SIDE, 16)
    with pytest.raises(ValueError, match="unknown candidate"):
        candidate_config(BASE, "magic")


def scored(name: str, scores: np.ndarray, labels: np.ndarray) -> CandidateResult:
    """A candidate result from its probe scores."""
    return CandidateResult(name, {}, float(roc_auc_score(labels, scores)), {}, 0.0, 0.0, scores.tolist())


def probe_labels(images: int, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and groups of a probe set: ``images`` normal images, then ``copies`` defects of each."""
    labels = np.array([0] * images + [1] * images * copies)
    groups = np.concatenate([np.arange(images), np.repeat(np.arange(images), copies)])
    return labels, groups


def test_a_later_candidate_is_chosen_only_when_it_leads_significantly() -> None:
    labels, groups = probe_labels(40, 4)
    rng = np.random.default_rng(0)
    weak = labels * 1.0 + rng.normal(0, 1.0, labels.size)  # AUROC about 0.76
    strong = labels * 3.0 + rng.normal(0, 1.0, labels.size)  # about 0.98
    settings = ProposalSettings(bootstrap_rounds=300)
    assert (
        choose_candidate(
            [scored("plain", weak, labels), scored("shared", strong, labels)], labels, groups, settings
        ).name
        == "shared"
    )
    # A lead by chance: the same scores plus noise far below their spread.
    jittered = weak + rng.normal(0, 0.02, labels.size)
    pair = [scored("plain", weak, labels), scored("shared", jittered, labels)]
    assert pair[1].probe_auroc != pair[0].probe_auroc
    assert choose_candidate(pair, labels, groups, settings).name == "plain"
    # Identical scores tie, so the first listed wins, whichever it is.
    same = [scored("augment4", strong, labels), scored("plain", strong, labels)]
    assert choose_candidate(same, labels, groups, settings).name == "augment4"
    # The best listed first is chosen.
    assert choose_candidate([pair[0], scored("x", weak - 5 * labels, labels)], labels, groups, settings).name == "plain"
    with pytest.raises(ValueError, match="no candidate"):
        choose_candidate([], labels, groups, settings)
    with pytest.raises(ValueError, match="one score per probe"):
        choose_candidate([scored("plain", weak[:-1], labels[:-1])], labels, groups, settings)


def test_bootstrap_rounds_resample_whole_held_out_images_and_are_seeded() -> None:
    labels, groups = probe_labels(10, 2)
    results = [scored("plain", labels + np.arange(labels.size) * 0.01, labels)]
    first = bootstrap_aurocs(results, labels, groups, 50, seed=1)
    assert first.shape == (50, 1) and np.array_equal(first, bootstrap_aurocs(results, labels, groups, 50, seed=1))
    assert not np.array_equal(first, bootstrap_aurocs(results, labels, groups, 50, seed=2))


def test_train_flags_name_the_padim_train_options() -> None:
    assert train_flags({}) == ""
    assert train_flags(CANDIDATE_OVERRIDES["augment4_any"]) == "--augment-copies 4 --augment-rotation 180"
    assert train_flags(CANDIDATE_OVERRIDES["shared"]) == "--statistics shared"
    assert train_flags(CANDIDATE_OVERRIDES["neighbourhood3"]) == "--neighbourhood 3"
    with pytest.raises(ValueError, match="eps"):
        train_flags({"eps": 0.1})


@pytest.mark.parametrize(
    ("options", "message"), [({"candidates": ()}, "at least one"), ({"candidates": ("plain", "plain")}, "repeat")]
)
def test_proposal_settings_refuse_empty_or_repeated_candidates(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProposalSettings(**options)  # type: ignore[arg-type]


# --- the probe set -----------------------------------------------------------------------------


def test_a_misplaced_patch_is_a_copy_of_another_square_of_the_image() -> None:
    rng = np.random.default_rng(3)
    image = rng.random((SIDE, SIDE, 3)).astype(np.float32)
    for seed in range(20):
        out, mask = misplace_patch(image, np.random.default_rng(seed))
        rows, cols = np.nonzero(mask)
        top, left, side = rows.min(), cols.min(), rows.max() - rows.min() + 1
        assert mask.sum() == 255 * side * side and cols.max() - left + 1 == side
        assert top >= SIDE // 8 and left >= SIDE // 8 and top + side <= SIDE - SIDE // 8  # off the border
        np.testing.assert_array_equal(out[mask == 0], image[mask == 0])
        pasted = out[top : top + side, left : left + side]
        matches = [
            (y, x)
            for y in range(SIDE - side + 1)
            for x in range(SIDE - side + 1)
            if np.array_equal(image[y : y + side, x : x + side], pasted)
        ]
        assert matches and all(max(abs(y - top), abs(x - left)) >= 2 * side for y, x in matches)
    with pytest.raises(ValueError, match="shape"):
        misplace_patch(np.zeros((16, 16, 3), np.float32), rng)


@pytest.mark.parametrize("crop", [None, 48])
def test_the_probe_set_reads_back_as_the_model_sees_the_originals(tmp_path: Path, crop: int | None) -> None:
    config = PadimConfig(backbone="resnet18", weights="random", image_size=SIDE, crop_size=crop, channels=16)
    rng = np.random.default_rng(0)
    originals = [rng.integers(0, 255, (90, 70, 3), dtype=np.uint8) for _ in range(3)]  # not the model's size
    uris = write_images(tmp_path / "in", originals)  # type: ignore[arg-type]
    probe = make_probe_set([*uris, str(tmp_path / "missing.png")], config, tmp_path / "probe", 4, seed=0)
    assert probe.kinds[:3] == ["good"] * 3 and len(probe.uris) == 3 * 5
    assert sorted(set(probe.kinds[3:])) == sorted(PROBE_DEFECTS)
    assert probe.labels.tolist() == [0] * 3 + [1] * 12
    assert [uri for uri, _ in probe.failed] == [str(tmp_path / "missing.png")]
    pre = Preprocessor(config, (0, 0, 0), (1, 1, 1), normalize=False)
    for original, normal in zip(uris, probe.uris[:3], strict=True):
        # Re-reading a normal probe through the model's preprocessing gives what the original gives.
        assert torch.equal(pre(Image.open(normal)), pre(Image.open(original)))
    side = config.input_size
    for index, uri in enumerate(probe.uris[3:]):
        normal = pre(Image.open(probe.uris[index // 4])).numpy()
        defective = pre(Image.open(uri)).numpy()
        assert defective.shape == (3, side, side) and not np.array_equal(defective, normal)
        if crop is not None:  # the defect lies inside the inspected square: outside it nothing changed
            full_normal = np.asarray(Image.open(probe.uris[index // 4]))
            full_defective = np.asarray(Image.open(uri))
            inside = np.zeros(full_normal.shape[:2], dtype=bool)
            offset = (SIDE - crop) // 2
            inside[offset : offset + crop, offset : offset + crop] = True
            np.testing.assert_array_equal(full_defective[~inside], full_normal[~inside])


def test_a_probe_set_needs_two_readable_images(tmp_path: Path) -> None:
    from padim.errors import PadimError

    uris = write_images(tmp_path / "in", halves(1, 0))
    with pytest.raises(PadimError, match="at least 2"):
        make_probe_set(uris, BASE, tmp_path / "probe", 1, seed=0)


# --- hand-built products with a known answer ------------------------------------------------------


def test_a_part_whose_halves_differ_gets_plain_padim_wherever_it_is_listed(tmp_path: Path) -> None:
    uris = write_images(tmp_path / "good", halves(40, 1))
    settings = ProposalSettings(candidates=("shared", "plain"))  # plain last: it must win on merit
    proposal = propose_setting(uris, BASE, FAST, settings, workdir=tmp_path)
    by_name = {r.name: r for r in proposal.results}
    assert [r.name for r in proposal.results] == ["shared", "plain"]
    assert proposal.chosen == "plain" and proposal.overrides == {} and proposal.flags == ""
    assert by_name["plain"].probe_auroc > by_name["shared"].probe_auroc + 0.1
    assert all(len(r.scores) == proposal.n_probe for r in proposal.results)
    # A dark scratch on the bright half looks like the dark half to the shared Gaussian, which
    # knows dark and bright patches alike; the Gaussian of its position does not.
    for kind in ("scratch", "spot", "crack"):
        assert by_name["plain"].auroc_by_defect[kind] > by_name["shared"].auroc_by_defect[kind] + 0.1
    assert proposal.n_fit == 30 and proposal.n_probe == 10 * (1 + settings.defects_per_image)
    assert not list(tmp_path.glob("padim-probe-*"))  # the probe images are removed


def test_padim_propose_prints_the_candidates_and_writes_json(tmp_path: Path) -> None:
    from padim_cli.main import app

    write_images(tmp_path / "good", halves(24, 3))
    out = tmp_path / "proposal.json"
    args = ["propose", str(tmp_path / "good"), "--backbone", "resnet18", "--weights", "random", "--image-size", "64"]
    args += [
        "--channels",
        "16",
        "--runtime",
        "torch",
        "--candidate",
        "shared",
        "--candidate",
        "plain",
        "--json",
        str(out),
    ]
    run = CliRunner().invoke(app, [*args, "--defects-per-image", "2"])
    assert run.exit_code == 0, run.output
    stored = json.loads(out.read_text())
    assert [r["name"] for r in stored["results"]] == ["shared", "plain"]
    assert (
        stored["chosen"] == "plain" and "proposed: plain; padim train options: (no option: plain PaDiM)" in run.output
    )
    assert stored["n_probe"] == 10 * 3 and stored["flags"] == train_flags(stored["overrides"])
    bad = CliRunner().invoke(app, ["propose", str(tmp_path / "good"), "--candidate", "magic"])
    assert bad.exit_code != 0


def test_the_benchmark_table_sets_each_proposal_beside_the_test_set_figures() -> None:
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "proposal.py"
    spec = importlib.util.spec_from_file_location("proposal_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["proposal_benchmark"] = module
    spec.loader.exec_module(module)
    assert set(module.VARIANT_OF) == set(CANDIDATE_OVERRIDES)
    candidates = [
        {"name": name, "probe_auroc": auroc, "auroc_by_defect": {"misplaced": 0.5}}
        for name, auroc in (("plain", 0.90), ("shared", 0.99))
    ]
    records = {
        "mvtec_bottle@shifted": {
            "chosen": "shared",
            "results": candidates,
            "seconds": 12.0,
            "measured_at": "2026-11-30 09:00",
            "machine": "test",
        }
    }
    accuracy = {
        "mvtec_bottle@shifted/default": {"image_auroc": 0.75},
        "mvtec_bottle@shifted/default_shared": {"image_auroc": 0.97},
        "mvtec_bottle@shifted/default_augment4_any": {"image_auroc": 0.99},  # not a candidate of this record
    }
    text = module.markdown_section(records, accuracy)
    assert text.startswith(module.BEGIN) and text.endswith(module.END)
    assert "| mvtec_bottle@shifted | `shared` | 0.9700 | `shared` 0.9700 | 0.7500 | 12 |" in text
    assert "0.9900 (0.500) / 0.9700 **proposed**" in text and "0.9000 (0.500) / 0.7500 |" in text


def test_a_corrupt_image_is_left_out_but_a_storage_fault_fails_the_proposal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import padim.evaluation.proposal as proposal_module
    from padim.errors import ImageReadError

    uris = write_images(tmp_path / "in", halves(3, 0))
    corrupt = tmp_path / "in" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    probe = make_probe_set([*uris, str(corrupt)], BASE, tmp_path / "probe", 1, seed=0)
    assert [uri for uri, _ in probe.failed] == [str(corrupt)] and len(probe.uris) == 6

    def unreachable(uri: str) -> Image.Image:
        raise ImageReadError(uri, "ConnectionError: storage unreachable")

    monkeypatch.setattr(proposal_module, "load_pil", unreachable)
    with pytest.raises(ImageReadError, match="unreachable"):
        make_probe_set(uris, BASE, tmp_path / "probe2", 1, seed=0)
