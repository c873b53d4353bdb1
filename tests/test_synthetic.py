"""Tests of the synthetic demo data set: layout, determinism, defects and their masks."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from padim.evaluation.mvtec import discover_layout
from padim.evaluation.synthetic import DEFECT_KINDS, make_defect, make_demo_dataset, make_surface

SMALL = {"n_train": 4, "n_night": 8, "size": 96}


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_is_mvtec_plus_a_flat_night(tmp_path: Path) -> None:
    dataset = make_demo_dataset(tmp_path / "data", seed=3, **SMALL)

    assert sorted(p.name for p in dataset.train_dir.iterdir()) == ["000.png", "001.png", "002.png", "003.png"]
    night = sorted(p.name for p in dataset.night_dir.iterdir())
    assert night == sorted(dataset.labels)
    assert len(night) == 8
    kinds = set(dataset.labels.values())
    assert kinds == {"good", *DEFECT_KINDS}
    assert dataset.n_defective == 5  # round(8 * 0.625)
    masks = sorted(p.name for p in dataset.night_masks_dir.iterdir())
    assert masks == sorted(n.replace(".png", "_mask.png") for n, k in dataset.labels.items() if k != "good")
    layout = discover_layout(dataset.root)  # what `padim evaluate` reads
    assert len(layout.train) == 4
    assert len(layout.test) == 8
    assert sorted({t.kind for t in layout.test}) == ["crack", "good", "scratch", "spot"]
    for name in dataset.labels:
        with Image.open(dataset.night_dir / name) as image:
            assert image.size == (96, 96)
            assert image.mode == "RGB"


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "a", seed=7, **SMALL)
    make_demo_dataset(tmp_path / "b", seed=7, **SMALL)
    make_demo_dataset(tmp_path / "c", seed=8, **SMALL)

    first, second, other = (_digests(tmp_path / x) for x in "abc")
    assert first == second
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first if k.endswith(".png") and "mask" not in k)


def test_normal_images_differ_from_each_other(tmp_path: Path) -> None:
    dataset = make_demo_dataset(tmp_path, seed=0, **SMALL)
    arrays = [np.asarray(Image.open(p), dtype=np.float32) for p in sorted(dataset.train_dir.iterdir())]
    for left, right in itertools.pairwise(arrays):
        assert np.abs(left - right).mean() > 2.0  # fresh grain, shift and brightness per image


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_changes_exactly_the_masked_region(kind: str) -> None:
    rng = np.random.default_rng(11)
    surface = make_surface(rng, 128)
    defective, mask = make_defect(surface, kind, rng)

    region = mask > 0
    assert mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    assert 10 < region.sum() < 0.1 * region.size  # a visible but small defect
    change = np.abs(defective - surface).max(axis=2)
    assert change[region].mean() > 0.1  # the defect is clearly darker or brighter
    grown = np.zeros_like(region)
    ys, xs = np.nonzero(region)
    grown[max(ys.min() - 3, 0) : ys.max() + 4, max(xs.min() - 3, 0) : xs.max() + 4] = True
    assert change[~grown].max() == 0.0  # nothing changes away from the defect
    margin = round(0.0625 * 128)  # the centre crop 224/256 removes 1/16 per side
    assert not region[:margin].any() and not region[-margin:].any()
    assert not region[:, :margin].any() and not region[:, -margin:].any()


def test_masks_on_disk_match_the_defects(tmp_path: Path) -> None:
    dataset = make_demo_dataset(tmp_path, seed=1, **SMALL)
    for name, kind in dataset.labels.items():
        if kind == "good":
            continue
        mask = np.asarray(Image.open(dataset.night_masks_dir / name.replace(".png", "_mask.png")))
        number = name.removesuffix(".png").split("_")[1]
        assert (mask == np.asarray(Image.open(dataset.root / "ground_truth" / kind / f"{number}_mask.png"))).all()
        assert (mask > 0).sum() > 10


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": 1}, {"n_night": 1}, {"size": 32}, {"defect_share": 1.0}, {"defect_share": 0.0}],
)
def test_rejects_unusable_sizes(tmp_path: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make_demo_dataset(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_make_defect_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown defect kind"):
        make_defect(np.zeros((64, 64, 3), dtype=np.float32), "dent", np.random.default_rng(0))
