"""The ``padim.model/2`` version layout: the scoring Gaussians are derived from the stored statistics.

A version saved with its statistics stores no mean and no whitening factor: :func:`load_model`
finalises the verified statistics with :func:`padim.core.fitter.finalize_gaussians`, the function the
fit uses, so the loaded model scores bit for bit as the fitted one. Versions without statistics,
or whose factor the statistics do not reproduce, store the factor; ``padim.model/1`` versions
(which always stored it) still load. Same cheap configuration as ``tests/test_artifact.py``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import padim.io.artifact as artifact
from padim.core.config import PadimConfig
from padim.core.covariance import pack_lower
from padim.core.fitter import PadimFitter, build_model
from padim.core.geometry import num_gaussians
from padim.core.model import PadimModel, Thresholds, TrainingInfo
from padim.core.statistics import GaussianAccumulator
from padim.errors import IncompatibleModelError, ModelIntegrityError
from padim.io.artifact import (
    FACTOR_FROM_STATISTICS,
    FACTOR_PACKED,
    MANIFEST,
    MODEL_FILE,
    MODEL_FORMAT,
    STATISTICS_FILE,
    load_model,
    save_model,
)

SIDE = 32
D = 20
BASE = PadimConfig(backbone="resnet18", weights="random", image_size=SIDE, crop_size=SIDE, channels=D)
GRID = (SIDE // 4, SIDE // 4)
FLOAT32 = 4


def images(n: int, seed: int) -> torch.Tensor:
    """Random "normalised images" ``(n, 3, SIDE, SIDE)``."""
    return torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def fit(config: PadimConfig, factor_dtype: torch.dtype = torch.float32) -> PadimModel:
    """A model fitted (in two batches) on six random images, with thresholds and provenance."""
    fitter = PadimFitter(config)
    batch = images(6, seed=1)
    fitter.update(batch[:4])
    fitter.update(batch[4:])
    training = TrainingInfo(
        n_train=6,
        training_set_sha256="ab" * 32,
        training_images=[(f"file:///data/good/{i:03d}.png", f"{i:064x}") for i in range(6)],
    )
    thresholds = Thresholds(image=12.5, pixel=9.75, image_fpr=0.01, pixel_fpr=0.001, n_images=4)
    return build_model(fitter, training=training, thresholds=thresholds, factor_dtype=factor_dtype)


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return images(3, seed=3)


@pytest.fixture(scope="module", params=["position", "shared", "both"])
def fitted(request: pytest.FixtureRequest) -> PadimModel:
    return fit(BASE.model_copy(update={"statistics": request.param}))


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def file_entry(path: Path) -> dict[str, object]:
    """A manifest's record of a file."""
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (its size less the 8-byte length and the header)."""
    raw = path.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header


def write_v1(model: PadimModel, directory: Path) -> None:
    """Write ``model`` in the ``padim.model/1`` layout: mean and packed factor stored, old manifest."""
    save_model(model, str(directory))
    path = directory / MODEL_FILE
    tensors = load_file(str(path))
    tensors["mean"] = model.mean.detach().float().cpu().contiguous()
    tensors["factor_packed"] = pack_lower(model.factor.detach().cpu())
    save_file(tensors, str(path), metadata={"format": "padim.model/1"})
    manifest = manifest_of(directory)
    manifest["format"] = "padim.model/1"
    for key in ("factor_storage", "statistics_device"):
        manifest.pop(key)
    manifest["files"][MODEL_FILE] = file_entry(path)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def assert_scores_equal(model: PadimModel, other: PadimModel, probe: torch.Tensor) -> None:
    before, after = model.predict(probe), other.predict(probe)
    assert torch.equal(after.anomaly_maps, before.anomaly_maps)
    assert torch.equal(after.scores, before.scores)


def test_round_trip_derives_the_fitted_gaussians_bit_for_bit(
    fitted: PadimModel, probe: torch.Tensor, tmp_path: Path
) -> None:
    save_model(fitted, str(tmp_path / "v"))
    manifest = manifest_of(tmp_path / "v")
    assert manifest["format"] == MODEL_FORMAT == "padim.model/2"
    assert manifest["factor_storage"] == FACTOR_FROM_STATISTICS and manifest["statistics_device"] == "cpu"
    loaded = load_model(str(tmp_path / "v"))
    assert loaded.accumulator is None  # read to derive the Gaussians, kept only on request
    assert loaded.factor.dtype == fitted.factor.dtype == torch.float32
    assert torch.equal(loaded.mean, fitted.mean)
    assert torch.equal(loaded.factor, fitted.factor)
    assert_scores_equal(fitted, loaded, probe)
    refit = load_model(str(tmp_path / "v"), with_statistics=True)
    assert refit.accumulator is not None and refit.accumulator.n == 6
    assert torch.equal(refit.factor, fitted.factor)


@pytest.mark.parametrize("statistics", ["position", "shared"])
def test_oas_shrinkage_round_trips_bit_for_bit(statistics: str, probe: torch.Tensor, tmp_path: Path) -> None:
    # OAS reads the upper triangle of the co-moments too, which the version stores mirrored.
    model = fit(BASE.model_copy(update={"covariance": "oas", "statistics": statistics}))
    save_model(model, str(tmp_path / "v"))
    loaded = load_model(str(tmp_path / "v"))
    assert torch.equal(loaded.mean, model.mean) and torch.equal(loaded.factor, model.factor)
    assert_scores_equal(model, loaded, probe)


def test_the_new_version_stores_no_factor_and_is_smaller_by_its_size(fitted: PadimModel, tmp_path: Path) -> None:
    new, old = tmp_path / "new", tmp_path / "old"
    save_model(fitted, str(new))
    write_v1(fitted, old)
    stored = load_file(str(new / MODEL_FILE))
    assert "factor_packed" not in stored and "factor" not in stored and "mean" not in stored
    assert set(stored) == {"channel_indices"}
    g, d = num_gaussians(fitted.config, GRID), D
    factor_bytes = FLOAT32 * g * d * (d + 1) // 2
    mean_bytes = FLOAT32 * g * d
    assert data_bytes(old / MODEL_FILE) - data_bytes(new / MODEL_FILE) == factor_bytes + mean_bytes
    sizes_new = {name: entry["size"] for name, entry in manifest_of(new)["files"].items()}
    sizes_old = {name: entry["size"] for name, entry in manifest_of(old)["files"].items()}
    assert sizes_new[STATISTICS_FILE] == sizes_old[STATISTICS_FILE]
    assert sum(sizes_old.values()) - sum(sizes_new.values()) >= factor_bytes + mean_bytes


def test_a_version_in_the_old_format_still_loads_and_scores_the_same(
    fitted: PadimModel, probe: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_v1(fitted, tmp_path / "v1")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a padim.model/1 version is served from its stored factor")

    monkeypatch.setattr(artifact, "finalize_gaussians", never)
    loaded = load_model(str(tmp_path / "v1"))
    assert torch.equal(loaded.mean, fitted.mean) and torch.equal(loaded.factor, fitted.factor)
    assert_scores_equal(fitted, loaded, probe)
    assert load_model(str(tmp_path / "v1"), with_statistics=True).accumulator is not None


@pytest.mark.parametrize("with_statistics", [False, True])
def test_altered_statistics_are_refused_before_any_gaussian_is_derived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_statistics: bool
) -> None:
    model = fit(BASE)
    save_model(model, str(tmp_path / "v"))
    path = tmp_path / "v" / STATISTICS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # a bit of some m2 entry: still parses, would give another factor
    path.write_bytes(bytes(data))
    derived: list[int] = []
    monkeypatch.setattr(artifact, "finalize_gaussians", lambda *a, **k: derived.append(1))
    monkeypatch.setattr(GaussianAccumulator, "from_state_dict", classmethod(lambda *a, **k: derived.append(2)))
    with pytest.raises(ModelIntegrityError, match="checksum mismatch for statistics"):
        load_model(str(tmp_path / "v"), with_statistics=with_statistics)
    assert derived == []


def test_a_derived_version_without_its_statistics_is_refused(tmp_path: Path) -> None:
    save_model(fit(BASE), str(tmp_path / "v"))
    (tmp_path / "v" / STATISTICS_FILE).unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        load_model(str(tmp_path / "v"))
    manifest = manifest_of(tmp_path / "v")
    del manifest["files"][STATISTICS_FILE]
    (tmp_path / "v" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelIntegrityError, match="lists no statistics"):
        load_model(str(tmp_path / "v"))


def test_without_statistics_the_factor_is_stored(probe: torch.Tensor, tmp_path: Path) -> None:
    model = fit(BASE)
    save_model(model, str(tmp_path / "slim"), keep_statistics=False)
    assert manifest_of(tmp_path / "slim")["factor_storage"] == FACTOR_PACKED
    assert {"mean", "factor_packed"} <= set(load_file(str(tmp_path / "slim" / MODEL_FILE)))
    loaded = load_model(str(tmp_path / "slim"))
    assert torch.equal(loaded.factor, model.factor)
    assert_scores_equal(model, loaded, probe)


def test_a_float64_factor_is_derived_in_its_dtype(probe: torch.Tensor, tmp_path: Path) -> None:
    model = fit(BASE, factor_dtype=torch.float64)
    save_model(model, str(tmp_path / "v"))
    manifest = manifest_of(tmp_path / "v")
    assert (manifest["factor_storage"], manifest["factor_dtype"]) == (FACTOR_FROM_STATISTICS, "float64")
    loaded = load_model(str(tmp_path / "v"))
    assert loaded.factor.dtype == torch.float64 and torch.equal(loaded.factor, model.factor)
    assert_scores_equal(model, loaded, probe)


def test_a_factor_converted_after_the_fit_is_stored(tmp_path: Path) -> None:
    model = fit(BASE).to_device("cpu", factor_dtype=torch.bfloat16)
    save_model(model, str(tmp_path / "v"))
    manifest = manifest_of(tmp_path / "v")
    assert (manifest["factor_storage"], manifest["factor_dtype"]) == (FACTOR_PACKED, "bfloat16")
    loaded = load_model(str(tmp_path / "v"))
    assert loaded.factor.dtype == torch.bfloat16 and torch.equal(loaded.factor, model.factor)


def test_statistics_changed_after_the_fit_do_not_replace_the_factor(probe: torch.Tensor, tmp_path: Path) -> None:
    model = fit(BASE)
    extra = GaussianAccumulator(GRID[0] * GRID[1], D)
    extra.update(torch.randn(3, D, *GRID, generator=torch.Generator().manual_seed(7)))
    model.accumulator.merge(extra)
    save_model(model, str(tmp_path / "v"))
    assert manifest_of(tmp_path / "v")["factor_storage"] == FACTOR_PACKED
    loaded = load_model(str(tmp_path / "v"), with_statistics=True)
    assert torch.equal(loaded.factor, model.factor) and loaded.accumulator.n == 9
    assert_scores_equal(model, loaded, probe)


def test_an_unknown_factor_storage_is_refused(tmp_path: Path) -> None:
    save_model(fit(BASE), str(tmp_path / "v"))
    manifest = manifest_of(tmp_path / "v")
    manifest["factor_storage"] = "zstd"
    (tmp_path / "v" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IncompatibleModelError, match="factor storage"):
        load_model(str(tmp_path / "v"))
