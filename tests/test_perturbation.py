"""The robustness benchmark's perturbed data sets (``benchmarks/perturbation.py``, issue 18).

Everything runs on a tiny synthetic MVTec-layout data set in ``tmp_path``: a dark textured
background with a bright square, whose mask is the square. Only the last test reads the shared
data sets, and skips without them.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SIZE = (72, 56)  # (width, height): not square, so x and y cannot be swapped unnoticed
SQUARE = (28, 20, 44, 36)  # (left, top, right, bottom), near the centre: reflections never reach it


def _load(name: str) -> ModuleType:
    """Import a benchmark script as a module (``benchmarks/`` is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


perturbation = _load("perturbation")


def _picture(seed: int, mode: str) -> tuple[Image.Image, Image.Image]:
    """A dark noisy image with a bright square, and the square's mask."""
    rng = np.random.default_rng(seed)
    width, height = SIZE
    left, top, right, bottom = SQUARE
    pixels = rng.integers(20, 60, size=(height, width, 3), dtype=np.uint8)
    pixels[top:bottom, left:right] = 230
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top:bottom, left:right] = 255
    image = Image.fromarray(pixels, mode="RGB")
    return (image.convert("L") if mode == "L" else image), Image.fromarray(mask, mode="L")


@pytest.fixture
def toy_dataset(tmp_path: Path) -> Path:
    """train/good (3 PNG), test/good (1 PNG), test/square (2 JPEG-free PNG + 1 grayscale) with masks."""
    root = tmp_path / "toy"
    for folder in ("train/good", "test/good", "test/square", "ground_truth/square"):
        (root / folder).mkdir(parents=True)
    for index in range(3):
        _picture(index, "RGB")[0].save(root / "train" / "good" / f"{index:03d}.png")
    _picture(10, "RGB")[0].save(root / "test" / "good" / "000.png")
    for index, (mode, suffix) in enumerate((("RGB", ".png"), ("RGB", ".bmp"), ("L", ".png"))):
        image, mask = _picture(20 + index, mode)
        image.save(root / "test" / "square" / f"{index:03d}{suffix}")
        mask.save(root / "ground_truth" / "square" / f"{index:03d}_mask.png")
    (root / "license.txt").write_text("synthetic\n", encoding="utf-8")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _centroid(binary: np.ndarray) -> np.ndarray:
    """``(x, y)`` centroid of a boolean image in continuous coordinates."""
    ys, xs = np.nonzero(binary)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


@pytest.mark.parametrize("name", ["shifted", "any_angle"])
def test_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(toy_dataset: Path, tmp_path: Path, name: str):
    first = perturbation.ensure_perturbed(toy_dataset, name, seed=3, cache_dir=tmp_path / "a")
    again = perturbation.ensure_perturbed(toy_dataset, name, seed=3, cache_dir=tmp_path / "b")
    other = perturbation.ensure_perturbed(toy_dataset, name, seed=4, cache_dir=tmp_path / "a")
    assert first.name == f"toy-{name}-seed3"
    first_files, again_files, other_files = _files(first), _files(again), _files(other)
    assert first_files == again_files
    images = [path for path in first_files if path.startswith(("train/", "test/"))]
    assert images and all(first_files[path] != other_files[path] for path in images)


def test_a_file_does_not_depend_on_the_others(toy_dataset: Path, tmp_path: Path):
    """Per-file generators: adding an image changes no other file."""
    before = _files(perturbation.ensure_perturbed(toy_dataset, "shifted", seed=0, cache_dir=tmp_path / "a"))
    _picture(99, "RGB")[0].save(toy_dataset / "train" / "good" / "aaa.png")  # sorts first
    after = _files(perturbation.ensure_perturbed(toy_dataset, "shifted", seed=0, cache_dir=tmp_path / "b"))
    assert set(after) - set(before) == {"train/good/aaa.png"}
    assert all(after[path] == data for path, data in before.items() if path != "manifest.json")


@pytest.mark.parametrize("name", ["shifted", "any_angle"])
def test_the_mask_is_transformed_exactly_like_the_image(toy_dataset: Path, tmp_path: Path, name: str):
    out = perturbation.ensure_perturbed(toy_dataset, name, seed=1, cache_dir=tmp_path)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    left, top, right, bottom = SQUARE
    square_centre = np.array([[(left + right) / 2, (top + bottom) / 2]])
    checked = 0
    for relative, entry in manifest["files"].items():
        if "mask" not in entry:
            continue
        image = np.asarray(Image.open(out / relative).convert("L"), dtype=np.float64)
        mask = np.asarray(Image.open(out / entry["mask"]))
        assert set(np.unique(mask)) <= {0, 255}
        bright = image > (image.min() + image.max()) / 2
        masked = mask > 0
        overlap = np.count_nonzero(bright & masked) / np.count_nonzero(bright | masked)
        assert overlap > 0.85, f"{relative}: the bright square and the mask overlap by {overlap:.2f}"
        draw = perturbation.Draw(**{k: entry[k] for k in ("dx", "dy", "angle", "brightness", "contrast")})
        expected = perturbation.map_points(square_centre, draw, SIZE)[0]
        np.testing.assert_allclose(_centroid(masked), expected, atol=0.75)
        np.testing.assert_allclose(_centroid(bright), expected, atol=0.75)
        checked += 1
    assert checked == 3


@pytest.mark.parametrize("name", ["shifted", "any_angle"])
def test_draws_stay_within_bounds(toy_dataset: Path, tmp_path: Path, name: str):
    spec = perturbation.PERTURBATIONS[name]
    width, height = SIZE
    entries = list(
        json.loads((perturbation.ensure_perturbed(toy_dataset, name, 0, tmp_path) / "manifest.json").read_text())[
            "files"
        ].values()
    )
    entries += [
        perturbation.draw_transform(spec, 0, f"train/good/{i}.png", SIZE).__dict__ | {"width": width, "height": height}
        for i in range(500)
    ]
    for entry in entries:
        assert abs(entry["dx"]) <= 0.1 * entry["width"] and abs(entry["dy"]) <= 0.1 * entry["height"]
        assert 0.8 <= entry["brightness"] <= 1.2 and 0.8 <= entry["contrast"] <= 1.2
        if spec.any_angle:
            assert 0.0 <= entry["angle"] < 360.0
        else:
            assert abs(entry["angle"]) <= 15.0
    angles = np.array([entry["angle"] for entry in entries])
    assert np.ptp(angles) > (300.0 if spec.any_angle else 25.0)  # the range is used, not just bounded


def test_the_largest_shift_moves_the_square_by_that_many_pixels():
    _, mask = _picture(0, "RGB")
    draw = perturbation.Draw(dx=0.1 * SIZE[0], dy=-0.1 * SIZE[1], angle=0.0, brightness=1.0, contrast=1.0)
    moved = np.asarray(perturbation.perturb_mask(mask, draw)) > 0
    np.testing.assert_allclose(_centroid(moved) - _centroid(np.asarray(mask) > 0), [7.2, -5.6], atol=0.5)


def test_the_identity_transform_keeps_every_pixel():
    image, mask = _picture(0, "RGB")
    identity = perturbation.Draw(dx=0.0, dy=0.0, angle=0.0, brightness=1.0, contrast=1.0)
    assert np.array_equal(np.asarray(perturbation.perturb_image(image, identity)), np.asarray(image))
    assert np.array_equal(np.asarray(perturbation.perturb_mask(mask, identity)), np.asarray(mask))


def test_photometry_changes_the_image_but_not_the_mask():
    image, mask = _picture(0, "L")
    draw = perturbation.Draw(dx=0.0, dy=0.0, angle=0.0, brightness=1.2, contrast=0.8)
    changed = np.asarray(perturbation.perturb_image(image, draw), dtype=np.float64)
    assert changed.mean() > np.asarray(image, dtype=np.float64).mean() + 5
    assert np.array_equal(np.asarray(perturbation.perturb_mask(mask, draw)), np.asarray(mask))


def test_the_layout_is_preserved_and_read_by_the_loader(toy_dataset: Path, tmp_path: Path):
    from padim.evaluation.mvtec import discover_layout

    out = perturbation.ensure_perturbed(toy_dataset, "any_angle", seed=0, cache_dir=tmp_path)
    source = {Path(p).with_suffix(".png").as_posix() for p in _files(toy_dataset) if not p.endswith(".txt")}
    assert set(_files(out)) == source | {"license.txt", "manifest.json"}
    assert (out / "license.txt").read_text(encoding="utf-8") == "synthetic\n"
    layout = discover_layout(out)
    assert len(layout.train) == 3
    assert sorted(image.kind for image in layout.test) == ["good", "square", "square", "square"]


def test_a_copy_is_reused_and_no_temporary_folder_is_left(toy_dataset: Path, tmp_path: Path):
    out = perturbation.ensure_perturbed(toy_dataset, "shifted", seed=0, cache_dir=tmp_path / "cache")
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert perturbation.ensure_perturbed(toy_dataset, "shifted", seed=0, cache_dir=tmp_path / "cache") == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [out.name]


def test_a_copy_of_another_generator_version_is_rebuilt(toy_dataset: Path, tmp_path: Path):
    out = perturbation.ensure_perturbed(toy_dataset, "shifted", seed=0, cache_dir=tmp_path / "cache")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    (out / "manifest.json").write_text(json.dumps({**manifest, "generator_version": -1}), encoding="utf-8")
    assert perturbation.ensure_perturbed(toy_dataset, "shifted", seed=0, cache_dir=tmp_path / "cache") == out
    assert perturbation.read_manifest(out)["generator_version"] == perturbation.GENERATOR_VERSION
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [out.name]


def test_mistakes_are_explained(toy_dataset: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturbation.ensure_perturbed(toy_dataset, "sideways", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_shift"):
        perturbation.Perturbation("bad", max_shift=0.7)
    with pytest.raises(ValueError, match="seed"):
        perturbation.file_seed(-1, "a.png")
    (toy_dataset / "ground_truth" / "square" / "orphan_mask.png").write_bytes(b"")
    with pytest.raises(ValueError, match="has no image"):
        perturbation.list_source_images(toy_dataset)


def test_the_accuracy_benchmark_names_perturbed_data_sets_and_skips_unknown_options(monkeypatch):
    accuracy = _load("accuracy")
    assert accuracy.parse_dataset("mvtec_bottle@any_angle") == ("mvtec_bottle", "any_angle")
    assert accuracy.parse_dataset("magnetic_tile") == ("magnetic_tile", None)
    with pytest.raises(ValueError, match="unknown perturbation"):
        accuracy.parse_dataset("mvtec_bottle@sideways")
    monkeypatch.setitem(accuracy.VARIANTS, "default_future", ("a remedy", {"no_such_option": 1}))
    assert "no_such_option" in accuracy.unsupported_reason("default_future")
    assert accuracy.unsupported_reason("default") is None
    result = accuracy.run_worker(Path("unused"), "default_future", 8, "mvtec_bottle@shifted")
    assert result == {"dataset_name": "mvtec_bottle", "variant": "default_future", "unsupported": result["unsupported"]}


def test_the_shared_data_sets_are_listed_with_every_mask():
    """Optional: the real data sets' layout is understood (no images are written)."""
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"the shared data sets are not on this machine ({SHARED_DATASETS} is absent)")
    pairs = perturbation.list_source_images(SHARED_DATASETS / "mvtec_bottle")
    assert len(pairs) == 209 + 20 + 63
    assert sum(mask is not None for _, mask in pairs) == 63


@pytest.mark.parametrize(
    ("dx", "dy", "angle"), [(5.0, -3.0, 12.0), (-4.5, 2.0, -15.0), (0.0, 0.0, 90.0), (3.0, 3.0, 200.0)]
)
def test_the_inverse_of_a_recorded_transform_puts_the_square_back(dx: float, dy: float, angle: float):
    anatomy = _load("misalignment_anatomy")
    _, mask = _picture(0, "RGB")
    draw = perturbation.Draw(dx=dx, dy=dy, angle=angle, brightness=1.0, contrast=1.0)
    moved = perturbation.perturb_mask(mask, draw)
    back = perturbation.perturb_mask(moved, anatomy.inverse_draw({"dx": dx, "dy": dy, "angle": angle}))
    original = np.asarray(mask) > 0
    restored = np.asarray(back) > 0
    np.testing.assert_allclose(_centroid(restored), _centroid(original), atol=0.6)
    assert (restored != original).mean() < 0.02  # nearest-neighbour rounding at the square's edge only
    if (dx, dy, angle) != (0.0, 0.0, 90.0):
        assert not np.array_equal(np.asarray(moved) > 0, original)  # the transform did move it


@pytest.mark.parametrize("part", ["shift_only", "rotation_only", "photometric_only"])
def test_a_part_of_the_perturbation_keeps_the_draws_of_the_others_off(toy_dataset: Path, tmp_path: Path, part: str):
    anatomy = _load("misalignment_anatomy")
    spec = anatomy.part_perturbation("shifted", part)
    full = perturbation.get_perturbation("shifted")
    assert spec.name == f"shifted_{part}"
    assert (spec.max_shift > 0) == (part == "shift_only") and (spec.max_shift == full.max_shift or spec.max_shift == 0)
    assert (spec.max_angle > 0) == (part == "rotation_only")
    assert (spec.max_photometric > 0) == (part == "photometric_only")
    relative = "train/good/000.png"
    whole = perturbation.draw_transform(full, 0, relative, SIZE)
    alone = perturbation.draw_transform(spec, 0, relative, SIZE)
    if part == "shift_only":  # the same draw of the kept part: the generator is consumed alike
        assert (alone.dx, alone.dy, alone.angle) == (whole.dx, whole.dy, 0.0)
    if part == "rotation_only":
        assert (alone.angle, alone.dx) == (whole.angle, 0.0)
