"""Remedies for parts that are not aligned (issue 18), each against a hand-built case with a known answer.

Shared statistics, augmentation, neighbourhood features, tolerant scoring and registration; a
saved and reloaded model of each option scores identically. A cheap configuration (random
ResNet18 at 32 px, d = 8) or hand-made embeddings keep it fast.
"""

from __future__ import annotations

import inspect
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from padim.core.alignment import augment_images, phase_shifts, pixel_gray, register_images, translate, with_reference
from padim.core.config import PadimConfig
from padim.core.embedding import aggregate_neighbourhood
from padim.core.features import FeatureBatch
from padim.core.fitter import PadimFitter, build_model, finalize_gaussians
from padim.core.geometry import num_gaussians
from padim.core.mahalanobis import tolerant_distances
from padim.core.model import PadimModel
from padim.core.scoring import gaussian_distances
from padim.core.statistics import GaussianAccumulator, pool_positions
from padim.io.artifact import load_model, save_model
from padim.io.store import ModelStore

SIDE = 32
GRID = SIDE // 4
BASE = {"backbone": "resnet18", "weights": "random", "image_size": SIDE, "crop_size": SIDE, "channels": 8}


def config(**options: object) -> PadimConfig:
    """The cheap configuration with some remedies on."""
    return PadimConfig(**BASE, **options)  # type: ignore[arg-type]


def images(n: int, seed: int, side: int = SIDE) -> torch.Tensor:
    """Random "normalised images" ``(n, 3, side, side)``."""
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def embeddings(n: int, d: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random float64 embeddings ``(n, d, h, w)``."""
    return torch.randn(n, d, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def numpy_mahalanobis(x: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> float:
    """``sqrt((x - mu)^T C^-1 (x - mu))`` the textbook way."""
    delta = x - mean
    return float(np.sqrt(delta @ np.linalg.solve(covariance, delta)))


# --- configuration ---------------------------------------------------------------------------


def test_defaults_are_plain_padim_and_keep_the_identity() -> None:
    plain = PadimConfig()
    assert (plain.statistics, plain.augment_copies, plain.neighbourhood, plain.tolerance, plain.registration) == (
        "position",
        0,
        1,
        0,
        "none",
    )
    assert not plain.plain_scoring
    assert set(plain.feature_identity()) == {
        "backbone",
        "weights",
        "channels",
        "channel_selection",
        "seed",
        "image_size",
        "crop_size",
        "resize_mode",
    }
    # what changes the embedding counts; what is read only when scoring does not
    assert config(neighbourhood=3).feature_identity() != config().feature_identity()
    assert config(augment_copies=2).feature_identity() != config().feature_identity()
    assert config(registration="phase").feature_identity() != config().feature_identity()
    assert config(tolerance=2, statistics="both").feature_identity() == config().feature_identity()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"neighbourhood": 2}, "odd"),
        ({"tolerance": -1}, "tolerance"),
        ({"statistics": "ring"}, "statistics"),
        ({"reference": "file:///x.png"}, "registration"),
        ({"augment_copies": -1}, "augment_copies"),
    ],
)
def test_invalid_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(**options)


def test_with_reference_picks_the_first_image_only_when_registering() -> None:
    assert with_reference(config(), "file:///a.png").reference is None
    assert with_reference(config(registration="phase"), "file:///a.png").reference == "file:///a.png"
    chosen = config(registration="phase", reference="file:///b.png")
    assert with_reference(chosen, "file:///a.png").reference == "file:///b.png"


# --- shared statistics -------------------------------------------------------------------------


def test_shared_statistics_equal_numpy_over_all_patch_rows() -> None:
    accumulator = GaussianAccumulator(num_positions=12, dim=5)
    batches = [embeddings(7, 5, 3, 4, seed=1) + 3.0, embeddings(4, 5, 3, 4, seed=2) * 2.0]
    for batch in batches:
        accumulator.update(batch)
    pooled = pool_positions(accumulator)
    rows = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, 5) for b in batches]).numpy()  # (n P, d)
    assert pooled.n == rows.shape[0] == 11 * 12
    np.testing.assert_allclose(pooled.mean[0].numpy(), rows.mean(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pooled.covariance()[0].numpy(), np.cov(rows, rowvar=False), rtol=1e-9, atol=1e-12)


def test_shared_and_both_distances_are_numpy_mahalanobis_and_their_minimum() -> None:
    accumulator = GaussianAccumulator(num_positions=6, dim=3)
    train = embeddings(20, 3, 2, 3, seed=3)
    accumulator.update(train)
    probe = embeddings(2, 3, 2, 3, seed=4) * 3.0
    rows = train.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    shared_cov = np.cov(rows, rowvar=False) + 0.01 * np.eye(3)
    shared_mean = rows.mean(axis=0)
    mean, factor = finalize_gaussians(accumulator, config(statistics="shared"), torch.float64)
    assert mean.shape == (1, 3) and factor.shape == (1, 3, 3)
    shared = gaussian_distances(probe, mean.double(), factor, config(statistics="shared"))
    for b, i, j in itertools.product(range(2), range(2), range(3)):
        expected = numpy_mahalanobis(probe[b, :, i, j].numpy(), shared_mean, shared_cov)
        assert shared[b, i, j].item() == pytest.approx(expected, rel=1e-6)  # the model keeps float32 means
    mean_b, factor_b = finalize_gaussians(accumulator, config(statistics="both"), torch.float64)
    assert mean_b.shape == (num_gaussians(config(statistics="both"), (2, 3)), 3) == (7, 3)
    both = gaussian_distances(probe, mean_b.double(), factor_b, config(statistics="both"))
    per_position = gaussian_distances(probe, mean_b[:6].double(), factor_b[:6], config())
    torch.testing.assert_close(both, torch.minimum(per_position, shared), rtol=0, atol=0)
    assert bool((both < per_position).any()) and bool((both < shared).any())  # each side wins somewhere


def test_shared_statistics_score_a_moved_patch_as_normal() -> None:
    """A pattern seen only at one position: shared statistics accept it anywhere, PaDiM does not."""
    patterns = embeddings(1, 4, 3, 3, seed=5)[0]  # a distinct vector per position
    noise = embeddings(40, 4, 3, 3, seed=6) * 0.05
    train = patterns.unsqueeze(0) + noise
    accumulator = GaussianAccumulator(num_positions=9, dim=4)
    accumulator.update(train)
    moved = patterns.roll(1, dims=2).unsqueeze(0).clone()  # every pattern one column to the right
    for statistics in ("position", "shared"):
        chosen = config(statistics=statistics, eps=1e-4)
        mean, factor = finalize_gaussians(accumulator, chosen, torch.float64)
        distances = gaussian_distances(moved, mean.double(), factor, chosen)
        if statistics == "position":
            assert distances.max().item() > 20.0
        else:
            assert distances.max().item() < 5.0


# --- tolerant scoring --------------------------------------------------------------------------


@pytest.mark.parametrize(("radius", "budget"), [(1, 1 << 30), (2, 1), (0, 1 << 30)])
def test_tolerant_distances_equal_a_brute_force_loop(radius: int, budget: int) -> None:
    b, d, h, w = 2, 3, 5, 6
    accumulator = GaussianAccumulator(num_positions=h * w, dim=d)
    accumulator.update(embeddings(9, d, h, w, seed=7))
    mean, factor = finalize_gaussians(accumulator, config(), torch.float64)
    probe = embeddings(b, d, h, w, seed=8)
    got = tolerant_distances(probe, mean.double(), factor, radius, budget_bytes=budget)
    covariance = accumulator.covariance(eps=0.01).numpy()
    means = accumulator.mean.numpy()
    for n, i, j in itertools.product(range(b), range(h), range(w)):
        best = np.inf
        for di, dj in itertools.product(range(-radius, radius + 1), repeat=2):
            q_i, q_j = i + di, j + dj
            if 0 <= q_i < h and 0 <= q_j < w:
                q = q_i * w + q_j
                best = min(best, numpy_mahalanobis(probe[n, :, i, j].numpy(), means[q], covariance[q]))
        assert got[n, i, j].item() == pytest.approx(best, rel=1e-6)  # float32 means


def test_a_shifted_copy_scores_as_normal_with_tolerance_at_least_the_shift() -> None:
    """Training patches: a distinct pattern per position; the probe: the same part shifted 2 patches."""
    fitter = PadimFitter(config(eps=1e-4), path="plain")
    patterns = embeddings(1, 8, GRID, GRID, seed=9)[0].float()
    noise = embeddings(30, 8, GRID, GRID, seed=10).float() * 0.05
    fitter.update(FeatureBatch.from_embedding(fitter.projector, patterns.unsqueeze(0) + noise))
    training = patterns.unsqueeze(0) + embeddings(1, 8, GRID, GRID, seed=11).float() * 0.05
    shift = 2
    padded = torch.nn.functional.pad(training, (shift, 0, shift, 0), mode="replicate")
    shifted = padded[:, :, :GRID, :GRID].contiguous()  # content moved down and right by 2 patches
    scores = {}
    for tolerance in (0, 1, 2, 3):
        model = build_model(fitter, factor_dtype=torch.float64)
        model.config = config(eps=1e-4, tolerance=tolerance)  # score-time option: no refit
        features = FeatureBatch.from_embedding(model.projector, shifted)
        scores[tolerance] = model.distances(features).max().item()
    normal = build_model(fitter).distances(FeatureBatch.from_embedding(fitter.projector, training)).max().item()
    assert scores[0] > 10 * normal and scores[1] > 10 * normal
    assert scores[2] < 2 * normal and scores[3] <= scores[2] + 1e-6


# --- neighbourhood -----------------------------------------------------------------------------


def test_neighbourhood_aggregation_is_the_3x3_mean() -> None:
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).view(2, 1, 4, 5) ** 1.5
    got = aggregate_neighbourhood(x, 3)
    assert got.shape == x.shape
    for b, i, j in itertools.product(range(2), range(4), range(5)):
        window = x[b, 0, max(0, i - 1) : i + 2, max(0, j - 1) : j + 2]
        assert got[b, 0, i, j].item() == pytest.approx(window.mean().item(), rel=1e-6)
    assert aggregate_neighbourhood(x, 1) is x
    with pytest.raises(ValueError, match="odd"):
        aggregate_neighbourhood(x, 2)


def test_neighbourhood_is_applied_at_fit_and_score_time() -> None:
    chosen = config(neighbourhood=3)
    fitter = PadimFitter(chosen)
    assert not fitter.uses_cells
    train = embeddings(6, 8, GRID, GRID, seed=12).float()
    fitter.update(FeatureBatch.from_embedding(fitter.projector, train))
    averaged = aggregate_neighbourhood(train, 3).double()
    torch.testing.assert_close(fitter.accumulator.mean, averaged.mean(dim=0).permute(1, 2, 0).reshape(-1, 8))
    model = build_model(fitter)
    probe = embeddings(2, 8, GRID, GRID, seed=13).float()
    got = model.distances(FeatureBatch.from_embedding(model.projector, probe))
    expected = tolerant_distances(aggregate_neighbourhood(probe, 3), model.mean, model.factor, 0)
    torch.testing.assert_close(got, expected)


# --- augmentation ------------------------------------------------------------------------------


def test_augmentation_keeps_the_statistics_exact_over_the_augmented_set() -> None:
    chosen = config(augment_copies=2, augment_seed=7, augment_flip=True)
    fitter = PadimFitter(chosen, path="plain")
    batches = [images(3, seed=14), images(3, seed=15)]
    for batch in batches:
        fitter.update(batch)
    # the same copies, drawn explicitly from the same seed, embedded batch by batch like the fitter
    generator = torch.Generator().manual_seed(7)
    mean, std = fitter.spec.mean, fitter.spec.std
    rows = []
    for batch in batches:
        copies = augment_images(batch, chosen, generator, mean, std)
        assert copies.shape == (6, 3, SIDE, SIDE)
        for part in (batch, copies[:3], copies[3:]):
            rows.append(fitter.embed(part).double())
    data = torch.cat(rows)  # (18, d, H, W)
    assert fitter.accumulator.n == 18
    flat = data.permute(2, 3, 0, 1).reshape(GRID * GRID, 18, 8).numpy()
    covariance = fitter.accumulator.covariance().numpy()
    for p in (0, 9, GRID * GRID - 1):
        np.testing.assert_allclose(covariance[p], np.cov(flat[p], rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fitter.accumulator.mean.numpy(), flat.mean(axis=1), rtol=1e-9, atol=1e-12)
    plain = PadimFitter(config(), path="plain")
    for batch in batches:
        plain.update(batch)
    assert not torch.allclose(plain.accumulator.mean, fitter.accumulator.mean)  # the copies count


def test_augmentation_copies_are_split_invariant_and_reflect_the_border() -> None:
    chosen = config(augment_copies=3, augment_seed=1)
    batch = images(4, seed=16)
    whole = augment_images(batch, chosen, torch.Generator().manual_seed(1), (0.5,) * 3, (0.5,) * 3)
    generator = torch.Generator().manual_seed(1)
    parts = [augment_images(batch[i : i + 1], chosen, generator, (0.5,) * 3, (0.5,) * 3) for i in range(4)]
    torch.testing.assert_close(whole, torch.cat(parts))
    identity = config(augment_copies=1, augment_shift=0.0, augment_rotation=0.0)
    same = augment_images(batch, identity, torch.Generator(), (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(same, batch, rtol=1e-5, atol=1e-5)
    pixels = torch.randint(0, 256, (2, 3, SIDE, SIDE), dtype=torch.uint8)
    copies = augment_images(pixels, chosen, torch.Generator(), (0.5,) * 3, (0.5,) * 3)
    assert copies.dtype == torch.uint8 and copies.shape == (6, 3, SIDE, SIDE)


# --- registration ------------------------------------------------------------------------------


def smooth_image(side: int, seed: int) -> torch.Tensor:
    """A smooth random RGB texture ``(1, 3, side, side)`` (a blurred noise field)."""
    noise = torch.randn(1, 3, side + 8, side + 8, generator=torch.Generator().manual_seed(seed))
    kernel = torch.ones(3, 1, 5, 5) / 25.0
    return torch.nn.functional.conv2d(noise, kernel, groups=3)[:, :, 2 : side + 2, 2 : side + 2].contiguous()


@pytest.mark.parametrize("shift", [(5, -7), (0, 3), (-9, 0), (0, 0)])
def test_phase_correlation_recovers_a_known_integer_shift(shift: tuple[int, int]) -> None:
    original = smooth_image(64, seed=17)
    moved = translate(original, torch.tensor([shift]))
    found = phase_shifts(moved.mean(dim=1), original[0].mean(dim=0))
    assert tuple(found[0].tolist()) == (-shift[0], -shift[1])
    back = register_images(moved, pixel_gray(original, (0.5,) * 3, (0.5,) * 3)[0], (0.5,) * 3, (0.5,) * 3)
    margin = 10
    inner = (slice(None), slice(None), slice(margin, -margin), slice(margin, -margin))
    torch.testing.assert_close(back[inner], original[inner], rtol=1e-5, atol=1e-5)


def test_a_registered_shifted_image_scores_like_the_original() -> None:
    """The part moved by (4, -8) px: registered, it scores as the part put back by hand does, and
    far lower than unregistered (only the reflected border strip, 8 px, is new to the model)."""
    side, shift = 64, torch.tensor([[4, -8]])
    base = {**BASE, "image_size": side, "crop_size": side, "eps": 1e-3}
    train = torch.cat([smooth_image(side, seed=18) + 0.02 * images(1, seed=20 + i, side=side) for i in range(12)])
    original, moved = train[:1], translate(train[:1], shift)
    put_back = translate(moved, -shift)
    maps = {}
    for registration in ("none", "phase"):
        fitter = PadimFitter(PadimConfig(**base, registration=registration), path="plain")  # type: ignore[arg-type]
        fitter.update(train[1:])
        model = build_model(fitter)
        if registration == "phase":
            assert model.reference is not None and model.reference.shape == (side, side)
            torch.testing.assert_close(model.reference, pixel_gray(train[1:2], model.spec.mean, model.spec.std)[0])
        maps[registration] = model.anomaly_maps(torch.cat([original, moved, put_back]))
    registered, unregistered = maps["phase"], maps["none"]
    torch.testing.assert_close(registered[1], unregistered[2], rtol=1e-5, atol=1e-5)  # registration = putting back
    scores = registered.amax(dim=(1, 2))
    assert scores[1] < 0.7 * unregistered[1].max()
    inner = (slice(None), slice(24, -24), slice(24, -24))  # away from the reflected strip
    part = registered[inner].amax(dim=(1, 2))
    assert part[1] < 1.6 * part[0] and unregistered[inner][1].max() > 3 * part[0]


# --- round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"statistics": "shared"},
        {"statistics": "both", "tolerance": 1},
        {"augment_copies": 2},
        {"neighbourhood": 3},
        {"tolerance": 2},
        {"registration": "phase"},
    ],
    ids=["shared", "both+tolerance", "augment", "neighbourhood", "tolerance", "registration"],
)
def test_a_saved_and_reloaded_model_scores_identically(options: dict[str, object], tmp_path: Path) -> None:
    chosen = config(**options)
    fitter = PadimFitter(chosen)
    fitter.update(images(5, seed=30))
    fitter.update(images(4, seed=31))
    model = build_model(fitter)
    store = ModelStore(str(tmp_path / "store"))
    version = store.publish("part", lambda url: save_model(model, url))
    loaded = load_model(store.version_url("part", version), with_statistics=True)
    assert isinstance(loaded, PadimModel) and loaded.config == chosen
    assert loaded.mean.shape == (num_gaussians(chosen, (GRID, GRID)), 8)
    probe = images(3, seed=32)
    expected, got = model.predict(probe), loaded.predict(probe)
    torch.testing.assert_close(got.anomaly_maps, expected.anomaly_maps, rtol=0, atol=0)
    torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=0)
    if chosen.registration != "none":
        torch.testing.assert_close(loaded.reference, model.reference, rtol=0, atol=0)


# --- command line ------------------------------------------------------------------------------

REMEDY_ARGS = [
    "--statistics",
    "both",
    "--tolerance",
    "1",
    "--neighbourhood",
    "3",
    "--augment-copies",
    "2",
    "--augment-seed",
    "5",
    "--augment-flip",
    "--registration",
    "phase",
]
REMEDY_FIELDS = {
    "statistics": "both",
    "tolerance": 1,
    "neighbourhood": 3,
    "augment_copies": 2,
    "augment_seed": 5,
    "augment_flip": True,
    "registration": "phase",
}


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """Put ``os.environ`` back after a CLI run (``padim``'s callback sets Prefect variables)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_padim_train_passes_the_remedies_to_the_flow_which_builds_them(
    monkeypatch: pytest.MonkeyPatch, restored_environ: None, tmp_path: Path
) -> None:
    from padim_prefect.flows.params import build_config

    import padim_cli.commands.train
    from padim_cli.main import app

    calls: list[dict[str, Any]] = []

    def fake_run_flow(name: str, dask: str | None = None, dask_workers: int | None = None, **parameters: Any) -> Any:
        calls.append(parameters)
        raise RuntimeError("stop")

    monkeypatch.setattr(padim_cli.commands.train, "run_flow", fake_run_flow)
    monkeypatch.setattr(padim_cli.commands.train, "check_backbone", lambda *args, **kwargs: None)
    args = ["train", "-p", "part", "--normal", str(tmp_path), "--store", str(tmp_path / "s"), *REMEDY_ARGS]
    CliRunner().invoke(app, args)
    assert len(calls) == 1
    assert {k: calls[0][k] for k in REMEDY_FIELDS} == REMEDY_FIELDS
    flow_params = inspect.signature(cli_flow_train()).parameters
    assert set(REMEDY_FIELDS) <= set(flow_params)
    config = build_config(**{k: v for k, v in calls[0].items() if k in PadimConfig.model_fields})
    assert config.remedies() == REMEDY_FIELDS


def cli_flow_train() -> Any:
    """The Python function of the train flow."""
    from padim_prefect.flows.train import train

    return getattr(train, "fn", train)


def test_padim_evaluate_takes_and_reports_the_remedies(
    monkeypatch: pytest.MonkeyPatch, restored_environ: None, tmp_path: Path
) -> None:
    import padim_cli.commands.evaluate
    from padim_cli.main import app

    seen: dict[str, Any] = {}
    monkeypatch.setattr(
        padim_cli.commands.evaluate, "run_evaluation", lambda _d, config, _s, **_k: seen.update(config=config)
    )
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), *REMEDY_ARGS])
    assert result.exit_code == 0, result.output
    assert seen["config"].remedies() == REMEDY_FIELDS
    bad = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--neighbourhood", "2"])
    assert bad.exit_code != 0 and "odd" in str(bad.exception)


def test_padim_evaluate_prints_the_remedies() -> None:
    from types import SimpleNamespace

    from padim_cli.commands.evaluate import metric_lines

    def result(chosen: PadimConfig) -> SimpleNamespace:
        return SimpleNamespace(
            config=chosen,
            dataset="d",
            device="cpu",
            n_train=1,
            n_holdout=0,
            n_test=1,
            n_test_anomalous=0,
            image_auroc=1.0,
            pixel_auroc=1.0,
            aupro=1.0,
            image_auroc_per_kind={},
            calibrated_threshold=None,
            image_f1_max=1.0,
            pixel_f1_max=1.0,
            fit_images_per_s=1.0,
            score_images_per_s=1.0,
            peak_rss_mb=1.0,
        )

    assert "unaligned parts     no remedy (plain PaDiM)\n" in "\n".join(metric_lines(result(config())))
    shown = "\n".join(metric_lines(result(config(statistics="shared", tolerance=2))))
    assert "unaligned parts     statistics=shared, tolerance=2\n" in shown
