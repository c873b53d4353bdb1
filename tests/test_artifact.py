"""The model artifact: exact round trip, tamper detection, compatibility checks, incremental refit.

A cheap configuration (random ResNet18 at 32 px, d = 20, random tensors as images) keeps this fast;
the artifact code does not depend on the backbone's weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from padim.core.config import PadimConfig
from padim.core.fitter import PadimFitter, build_model
from padim.core.model import PadimModel, Thresholds, TrainingInfo
from padim.core.statistics import GaussianAccumulator
from padim.errors import IncompatibleModelError, ModelIntegrityError, ModelNotFoundError
from padim.io.artifact import MANIFEST, MODEL_FILE, STATISTICS_FILE, TRAINING_FILE, load_model, save_model
from padim.io.statistics_files import load_statistics, save_statistics

SIDE = 32
CONFIG = PadimConfig(backbone="resnet18", weights="random", image_size=SIDE, crop_size=SIDE, channels=20)
GRID = SIDE // 4


def images(n: int, seed: int) -> torch.Tensor:
    """Random "normalised images" ``(n, 3, SIDE, SIDE)``."""
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def batch_a() -> torch.Tensor:
    return images(6, seed=1)


@pytest.fixture(scope="module")
def batch_b() -> torch.Tensor:
    return images(5, seed=2)


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return images(3, seed=3)


@pytest.fixture(scope="module")
def model_a(batch_a: torch.Tensor) -> PadimModel:
    """A model fitted on ``batch_a``, with thresholds and provenance."""
    fitter = PadimFitter(CONFIG)
    fitter.update(batch_a[:4])
    fitter.update(batch_a[4:])
    training = TrainingInfo(
        n_train=6,
        training_set_sha256="ab" * 32,
        training_images=[(f"file:///data/good/{i:03d}.png", f"{i:064x}") for i in range(6)],
    )
    thresholds = Thresholds(image=12.5, pixel=9.75, image_fpr=0.01, pixel_fpr=0.001, n_images=4)
    return build_model(fitter, training=training, thresholds=thresholds)


@pytest.fixture
def saved(model_a: PadimModel, tmp_path: Path) -> Path:
    """``model_a`` saved (with statistics) into a fresh directory."""
    target = tmp_path / "model" / "v1"
    save_model(model_a, str(target))
    return target


def edit_manifest(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the manifest after applying ``change`` to it."""
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_round_trip_is_exact(model_a: PadimModel, saved: Path, probe: torch.Tensor) -> None:
    loaded = load_model(str(saved))
    assert loaded.config == model_a.config == CONFIG
    assert torch.equal(loaded.mean, model_a.mean)
    assert torch.equal(loaded.factor, model_a.factor) and loaded.factor.dtype == torch.float32
    assert loaded.mean.shape == (GRID * GRID, 20) and loaded.factor.shape == (GRID * GRID, 20, 20)
    assert torch.equal(loaded.projector.indices, model_a.projector.indices)
    assert loaded.thresholds == model_a.thresholds
    assert loaded.training == model_a.training
    assert loaded.weights_sha256 == model_a.weights_sha256 == "random:0"
    assert loaded.accumulator is None  # statistics only on request
    before = model_a.predict(probe)
    after = loaded.predict(probe)
    assert after.anomaly_maps.shape == (3, SIDE, SIDE)
    assert torch.equal(after.anomaly_maps, before.anomaly_maps)
    assert torch.equal(after.scores, before.scores)


def test_round_trip_with_statistics(model_a: PadimModel, saved: Path) -> None:
    loaded = load_model(str(saved), with_statistics=True)
    assert loaded.accumulator is not None and model_a.accumulator is not None
    assert loaded.accumulator.n == 6
    assert torch.equal(loaded.accumulator.mean, model_a.accumulator.mean)
    # The artifact stores the lower triangle of each symmetric M2 (half the bytes): it comes back
    # bit for bit, mirrored into the upper triangle (which the float64 update rounds independently).
    assert torch.equal(torch.tril(loaded.accumulator.m2), torch.tril(model_a.accumulator.m2))
    assert torch.equal(loaded.accumulator.m2, loaded.accumulator.m2.transpose(1, 2))
    torch.testing.assert_close(loaded.accumulator.m2, model_a.accumulator.m2, rtol=1e-12, atol=1e-12)
    assert loaded.accumulator.m2.dtype == torch.float64


def test_manifest_records_the_model(saved: Path, model_a: PadimModel) -> None:
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["backbone"] == "resnet18" and manifest["weights_sha256"] == "random:0"
    assert manifest["taps"] == ["layer1", "layer2", "layer3"]
    assert (manifest["image_size"], manifest["crop_size"], manifest["eps"]) == (SIDE, SIDE, 0.01)
    assert manifest["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert manifest["channel_indices"] == model_a.projector.indices.tolist()
    assert manifest["n_train"] == 6 and manifest["training_set_sha256"] == "ab" * 32
    assert manifest["created_at"] and manifest["library_version"]
    for name in (MODEL_FILE, STATISTICS_FILE, TRAINING_FILE):
        data = (saved / name).read_bytes()
        assert manifest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def test_artifact_contains_no_pickle(saved: Path) -> None:
    names = sorted(p.name for p in saved.iterdir())
    assert names == sorted([MANIFEST, MODEL_FILE, STATISTICS_FILE, TRAINING_FILE])
    for path in saved.iterdir():
        data = path.read_bytes()
        assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4]  # pickle / torch zip
        if path.suffix == ".safetensors":
            assert all(isinstance(t, torch.Tensor) for t in load_file(str(path)).values())
        else:
            assert path.suffix == ".json"
            json.loads(data)


def test_flipped_byte_is_detected(saved: Path) -> None:
    path = saved / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="checksum"):
        load_model(str(saved))


def test_altered_statistics_are_detected(saved: Path) -> None:
    path = saved / STATISTICS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80
    path.write_bytes(bytes(data))
    # Serving reads them too: the scoring Gaussians are derived from them (padim.model/2).
    for with_statistics in (False, True):
        with pytest.raises(ModelIntegrityError, match="checksum"):
            load_model(str(saved), with_statistics=with_statistics)


def test_truncated_file_is_detected(saved: Path) -> None:
    path = saved / TRAINING_FILE
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ModelIntegrityError):
        load_model(str(saved))


@pytest.mark.parametrize("name", [MODEL_FILE, TRAINING_FILE, STATISTICS_FILE])
def test_deleted_file_is_detected(saved: Path, name: str) -> None:
    (saved / name).unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        load_model(str(saved), with_statistics=True)


def test_missing_or_corrupt_manifest(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_model(str(tmp_path / "nothing-here"))
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(ModelIntegrityError, match="not valid JSON"):
        load_model(str(saved))


def _set_config(key: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        manifest["config"][key] = value

    return change


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda m: m.update(format="padim.model/99"), "format"),
        (lambda m: m.pop("format"), "format"),
        (_set_config("unknown_field", 1), "configuration"),
        (_set_config("backbone", "vgg16"), "configuration"),
        (lambda m: m.update(taps=["layer1", "layer2", "layer4"]), "taps"),
        (_set_config("channels", 30), "do not match"),
        (lambda m: m["config"].update(image_size=2 * SIDE, crop_size=2 * SIDE), "do not match"),
        (lambda m: m["thresholds"].update(colour="red"), "thresholds"),
    ],
)
def test_incompatible_models_are_refused(saved: Path, change: Callable[[dict[str, Any]], None], match: str) -> None:
    edit_manifest(saved, change)
    with pytest.raises(IncompatibleModelError, match=match):
        load_model(str(saved))


def test_statistics_of_another_shape_are_refused(saved: Path) -> None:
    other = GaussianAccumulator(GRID * GRID, 21)
    other.update(torch.randn(3, 21, GRID, GRID))
    path = saved / STATISTICS_FILE
    save_file(other.state_dict(), str(path))
    data = path.read_bytes()

    def record(manifest: dict[str, Any]) -> None:
        manifest["files"][STATISTICS_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    edit_manifest(saved, record)
    with pytest.raises(IncompatibleModelError, match="statistics"):
        load_model(str(saved), with_statistics=True)


def test_model_saved_without_statistics_cannot_be_refit(model_a: PadimModel, tmp_path: Path) -> None:
    save_model(model_a, str(tmp_path / "slim"), keep_statistics=False)
    assert not (tmp_path / "slim" / STATISTICS_FILE).exists()
    assert load_model(str(tmp_path / "slim")).accumulator is None
    with pytest.raises(IncompatibleModelError, match="without its statistics"):
        load_model(str(tmp_path / "slim"), with_statistics=True)


def test_incremental_refit_equals_fit_from_scratch(
    saved: Path, batch_a: torch.Tensor, batch_b: torch.Tensor, probe: torch.Tensor
) -> None:
    loaded = load_model(str(saved), with_statistics=True)
    assert loaded.accumulator is not None
    refit = PadimFitter(CONFIG, accumulator=loaded.accumulator, projector=loaded.projector)
    refit.update(batch_b)
    incremental = build_model(refit)

    scratch = PadimFitter(CONFIG)
    for batch in (batch_a[:3], batch_a[3:], batch_b[:2], batch_b[2:]):  # another split of A + B
        scratch.update(batch)
    fresh = build_model(scratch)

    a, b = refit.accumulator, scratch.accumulator
    assert a.n == b.n == 11
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-9, atol=0)
    scale = float(b.m2.abs().max())
    torch.testing.assert_close(a.m2, b.m2, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(a.finalize().covariance, b.finalize().covariance, rtol=0, atol=1e-9 * scale / 10)
    torch.testing.assert_close(incremental.mean, fresh.mean, rtol=1e-6, atol=1e-6)
    factor_scale = float(fresh.factor.abs().max())
    torch.testing.assert_close(incremental.factor, fresh.factor, rtol=0, atol=1e-5 * factor_scale)
    torch.testing.assert_close(incremental.predict(probe).scores, fresh.predict(probe).scores, rtol=1e-5, atol=0)
    # The statistics before the refit really were A alone (the test is not comparing B with B).
    assert loaded.accumulator.n == 11 and load_model(str(saved), with_statistics=True).accumulator.n == 6


def test_fitter_refuses_statistics_of_another_configuration(model_a: PadimModel) -> None:
    assert model_a.accumulator is not None
    with pytest.raises(ValueError, match="existing statistics"):
        PadimFitter(CONFIG.model_copy(update={"channels": 21}), accumulator=model_a.accumulator)


def test_partial_statistics_files_merge_to_the_whole(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    embeddings = torch.randn(12, 4, 3, 3, generator=generator, dtype=torch.float64) * 2.0 + 100.0
    whole = GaussianAccumulator(9, 4)
    whole.update(embeddings)
    for index, (start, stop) in enumerate([(0, 5), (5, 6), (6, 12)]):
        shard = GaussianAccumulator(9, 4)
        shard.update(embeddings[start:stop])
        target = tmp_path / "partials" / f"shard-{index}.safetensors"
        save_statistics(shard, str(target), metadata={"shard": str(index)})
    merged = GaussianAccumulator(9, 4)
    for index in (2, 0, 1):
        partial, metadata = load_statistics(str(tmp_path / "partials" / f"shard-{index}.safetensors"))
        assert metadata["shard"] == str(index)
        merged.merge(partial)
    assert merged.n == 12
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.m2, whole.m2, rtol=0, atol=1e-9 * float(whole.m2.abs().max()))
    assert sorted(p.name for p in (tmp_path / "partials").iterdir()) == [f"shard-{i}.safetensors" for i in range(3)]


def test_partial_statistics_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        load_statistics(str(tmp_path / "absent.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelIntegrityError):
        load_statistics(str(garbage))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"n": torch.tensor([1]), "mean": torch.zeros(1, 1), "m2": torch.zeros(1, 1, 1)}, str(foreign))
    with pytest.raises(ModelIntegrityError, match="not a padim statistics file"):
        load_statistics(str(foreign))


def test_fitter_cell_statistics_equal_the_plain_update(batch_a: torch.Tensor, batch_b: torch.Tensor) -> None:
    fitter = PadimFitter(CONFIG)
    assert fitter.uses_cells  # ResNet18 at 32 px: grid 8 x 8, cells of 1, 2 and 4
    plain = GaussianAccumulator(fitter.accumulator.num_positions, fitter.accumulator.dim)
    for batch in (batch_a, batch_b):
        fitter.update(batch)
        plain.update(fitter.embed(batch))
    fitted = fitter.accumulator
    assert fitter.uses_cells  # the stage maps tiled the grid on real images
    assert fitted.n == plain.n == 11
    torch.testing.assert_close(fitted.mean, plain.mean, rtol=1e-12, atol=1e-12)
    scale = float(plain.m2.abs().max())
    torch.testing.assert_close(fitted.m2, plain.m2, rtol=0, atol=1e-12 * scale)


def test_banded_scoring_equals_scoring_the_whole_embedding(model_a: PadimModel, probe: torch.Tensor) -> None:
    from padim.core.mahalanobis import TriangleBlocks, mahalanobis_distances

    assert isinstance(model_a.scoring_factor(), TriangleBlocks)  # a Cholesky factor on the CPU
    embeddings = model_a.extractor()(probe)
    # Reference: the whole batch's embedding against the full factor, one product per position.
    reference = model_a.anomaly_map(mahalanobis_distances(embeddings, model_a.mean, model_a.factor))
    maps = model_a.anomaly_maps(probe)
    torch.testing.assert_close(maps, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    # A factor that is not triangular is scored with the full product, never cut.
    altered = copy.deepcopy(model_a)
    altered.factor = altered.factor.clone()
    altered.factor[:, 0, -1] = 0.5
    assert isinstance(altered.scoring_factor(), torch.Tensor)
    expected = altered.anomaly_map(mahalanobis_distances(embeddings, altered.mean, altered.factor))
    scale = float(expected.abs().max())
    torch.testing.assert_close(altered.anomaly_maps(probe), expected, rtol=1e-5, atol=1e-5 * scale)
    assert not torch.allclose(expected, reference)


@pytest.mark.parametrize("selection", ["random", "all", "semi_orthogonal"])
def test_banded_scoring_of_every_channel_reduction(selection: str) -> None:
    from padim.core.mahalanobis import mahalanobis_distances
    from padim.core.scoring import banded_distances

    config = CONFIG.model_copy(update={"channel_selection": selection, "image_size": 64, "crop_size": 64})
    fitter = PadimFitter(config)
    train = torch.randint(0, 256, (40, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    fitter.update(train)
    model = build_model(fitter)
    probe = train[:4].flip(-1)
    reference = mahalanobis_distances(model.extractor()(probe), model.mean, model.factor)
    extractor = model.extractor()
    features = extractor.features(probe)
    if selection == "semi_orthogonal":
        maps, projector = features, model.projector
    else:
        maps, projector = [m.clone() for m in extractor.stage_maps(probe)], None
        assert sum(m.shape[1] for m in maps) == model.channels
    for band_bytes in (1, 1 << 30):  # the narrowest bands (one coarse row) and one band
        got = banded_distances(maps, model.mean, model.scoring_factor(), model.grid, projector, band_bytes)
        assert got is not None
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    torch.testing.assert_close(model.anomaly_maps(probe), model.anomaly_map(reference), rtol=1e-5, atol=1e-4)
    # Maps that are not the grid divided by whole factors are left to the whole-batch path.
    cropped = [f[..., :-1] for f in maps]
    assert banded_distances(cropped, model.mean, model.factor, model.grid, projector) is None
