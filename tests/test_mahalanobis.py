"""Batched Mahalanobis distances against scipy, and the whitening factor's defining identity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import oas

from padim.core.anomaly_map import image_scores
from padim.core.config import PadimConfig
from padim.core.features import FeatureBatch
from padim.core.fitter import build_model
from padim.core.mahalanobis import (
    is_lower_triangular,
    mahalanobis_distances,
    row_blocks,
    triangle_blocks,
    whitening_factor,
    whitening_from_accumulator,
)
from padim.core.statistics import GaussianAccumulator

B, D, H, W = 3, 6, 2, 3
P = H * W


def random_case(seed: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings ``(B, d, H, W)``, means ``(P, d)`` and SPD covariances ``(P, d, d)`` (float64)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(P, D, D))
    covariance = a @ a.transpose(0, 2, 1) / D + 0.05 * np.eye(D)
    mean = offset + rng.normal(size=(P, D))
    lower = np.linalg.cholesky(covariance)
    draws = mean[:, :, None] + 1.5 * lower @ rng.normal(size=(P, D, B))  # (P, d, B)
    embeddings = draws.transpose(2, 1, 0).reshape(B, D, H, W)
    return embeddings, mean, covariance


def scipy_distances(embeddings: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """Reference: ``scipy.spatial.distance.mahalanobis`` per image and position, ``(B, H, W)``."""
    flat = embeddings.reshape(B, D, P)
    out = np.empty((B, P))
    for p in range(P):
        inverse = np.linalg.inv(covariance[p])
        for b in range(B):
            out[b, p] = mahalanobis(flat[b, :, p], mean[p], inverse)
    return out.reshape(B, H, W)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_scipy(seed: int) -> None:
    embeddings, mean, covariance = random_case(seed, offset=3.0)
    expected = scipy_distances(embeddings, mean, covariance)
    factor = whitening_factor(torch.from_numpy(covariance))
    # float32 storage (the default), float32 embeddings: 1e-4 relative.
    got32 = mahalanobis_distances(torch.from_numpy(embeddings).float(), torch.from_numpy(mean).float(), factor.float())
    assert got32.shape == (B, H, W) and got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-4)
    # float64 end to end keeps float64 precision (no float32 step inside).
    got64 = mahalanobis_distances(torch.from_numpy(embeddings), torch.from_numpy(mean), factor)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), expected, rtol=1e-10)
    # (B, d, P) layout gives (B, P).
    flat = mahalanobis_distances(torch.from_numpy(embeddings).flatten(2), torch.from_numpy(mean), factor)
    assert flat.shape == (B, P)
    np.testing.assert_allclose(flat.numpy(), expected.reshape(B, P), rtol=1e-10)


def test_chunked_equals_unchunked() -> None:
    embeddings, mean, covariance = random_case(3)
    x = torch.from_numpy(embeddings).float()
    mu = torch.from_numpy(mean).float()
    factor = whitening_factor(torch.from_numpy(covariance)).float()
    whole = mahalanobis_distances(x, mu, factor)
    for chunk in (1, 2, 4, P, 100):
        assert torch.equal(mahalanobis_distances(x, mu, factor, chunk=chunk), whole), chunk


@pytest.mark.parametrize("d", [5, 31, 64, 100, 131])
def test_triangular_blocks_equal_the_full_product(d: int) -> None:
    rng = np.random.default_rng(d)
    a = rng.normal(size=(7, d, d))
    covariance = torch.from_numpy(a @ a.transpose(0, 2, 1) / d + 0.1 * np.eye(d))
    factor = whitening_factor(covariance)
    assert is_lower_triangular(factor) and is_lower_triangular(factor.float(), chunk=2)
    mean = torch.from_numpy(rng.normal(size=(7, d)))
    x = torch.from_numpy(rng.normal(size=(4, d, 7)) + 0.5)
    # float64: the blocks give the full product's distances to rounding.
    full = mahalanobis_distances(x, mean, factor)
    blocked = triangle_blocks(factor)
    torch.testing.assert_close(mahalanobis_distances(x, mean, blocked), full, rtol=1e-12, atol=0)
    # float32 (the stored model): within float32 rounding of the float64 distances.
    got = mahalanobis_distances(x.float(), mean.float(), triangle_blocks(factor.float()), chunk=3)
    torch.testing.assert_close(got.double(), full, rtol=1e-5, atol=0)
    # Positions of a block view score like the same positions of the whole.
    part = mahalanobis_distances(x[:, :, 2:5], mean[2:5], blocked.positions(2, 5))
    torch.testing.assert_close(part, full[:, 2:5], rtol=1e-12, atol=0)
    assert blocked.nbytes < factor.numel() * 8 or d < 64
    # The blocks tile the rows in order.
    blocks = row_blocks(d)
    assert blocks[0][0] == 0 and blocks[-1][1] == d
    assert all(b[0] == a[1] for a, b in itertools.pairwise(blocks))


def test_a_full_factor_is_not_taken_for_triangular() -> None:
    factor = torch.eye(4).repeat(3, 1, 1)
    assert is_lower_triangular(factor)
    factor[2, 0, 3] = 1e-9
    assert not is_lower_triangular(factor, chunk=2)
    with pytest.raises(ValueError, match="not lower triangular"):
        triangle_blocks(factor)


def test_whitening_factor_whitens() -> None:
    _, _, covariance = random_case(4)
    s = torch.from_numpy(covariance)
    factor = whitening_factor(s)
    identity = factor @ s @ factor.transpose(1, 2)
    np.testing.assert_allclose(identity.numpy(), np.broadcast_to(np.eye(D), (P, D, D)), atol=1e-10)
    assert torch.equal(factor, factor.tril())  # lower triangular
    assert factor.dtype == torch.float64


def test_whitening_factor_rejects_non_positive_definite() -> None:
    _, _, covariance = random_case(5)
    covariance[2] = np.diag([1.0, 1.0, -1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="position 2 is not positive definite"):
        whitening_factor(torch.from_numpy(covariance))


def test_whitening_from_accumulator_matches_direct_factor() -> None:
    rng = np.random.default_rng(6)
    acc = GaussianAccumulator(P, D)
    acc.update(torch.from_numpy(rng.normal(size=(20, D, H, W)) + 7.0))
    eps = 0.01
    direct = whitening_factor(acc.finalize(eps).covariance)
    for chunk in (1, 4, 512):
        chunked = whitening_from_accumulator(acc, eps, dtype=torch.float64, chunk=chunk)
        np.testing.assert_allclose(chunked.numpy(), direct.numpy(), rtol=1e-12, atol=1e-12)
    assert whitening_from_accumulator(acc, eps).dtype == torch.float32


def test_shape_mismatch_is_rejected() -> None:
    embeddings, mean, covariance = random_case(7)
    factor = whitening_factor(torch.from_numpy(covariance))
    with pytest.raises(ValueError, match="do not match"):
        mahalanobis_distances(torch.from_numpy(embeddings)[:, :-1], torch.from_numpy(mean), factor)


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        torch.bmm(torch.ones(1, 2, 2, dtype=dtype), torch.ones(1, 2, 1, dtype=dtype))
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    [
        # float16 keeps 11 significant bits: the factor's rounding moves distances < 1e-3.
        (torch.float16, 1e-3),
        # bfloat16 keeps 8: about 8x coarser, so the bound is 1e-2 (measured ~5e-3 here).
        (torch.bfloat16, 1e-2),
    ],
)
def test_reduced_precision_factor(dtype: torch.dtype, rtol: float) -> None:
    if not _cpu_supports(dtype):
        pytest.skip(f"this CPU build of torch has no {dtype} batched matrix product")
    # Embeddings far from the origin (as real features are): the code must centre before rounding.
    embeddings, mean, covariance = random_case(8, offset=50.0)
    expected = scipy_distances(embeddings, mean, covariance)
    factor = whitening_factor(torch.from_numpy(covariance)).to(dtype)
    got = mahalanobis_distances(torch.from_numpy(embeddings).float(), torch.from_numpy(mean).float(), factor)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=rtol)


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` matrix of bilinear upsampling with half-pixel centres (edge clamped)."""
    source = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
    return np.maximum(0.0, 1.0 - np.abs(source[:, None] - np.arange(n_in)[None, :]))


@pytest.mark.parametrize("covariance", ["fixed", "oas"])
def test_model_scoring_equals_the_reference_composition(covariance: str) -> None:
    """numpy covariance + eps -> scipy Mahalanobis -> bilinear upsampling -> scipy blur -> max."""
    config = PadimConfig(
        backbone="resnet18", weights="random", image_size=32, crop_size=32, channels=5, covariance=covariance
    )
    grid, d, n = 8, 5, 30
    rng = np.random.default_rng(9)
    train = rng.normal(size=(n, d, grid, grid)) + 20.0
    test = rng.normal(size=(2, d, grid, grid)) * 1.5 + 20.0
    acc = GaussianAccumulator(grid * grid, d)
    acc.update(torch.from_numpy(train[:11]))
    acc.update(torch.from_numpy(train[11:]))
    model = build_model(config, acc, weights_sha256="random:0")
    embeddings = FeatureBatch.from_embedding(model.projector, torch.from_numpy(test).float())
    maps = model.anomaly_maps(embeddings).numpy()

    flat_train = train.reshape(n, d, -1)
    flat_test = test.reshape(2, d, -1)
    distances = np.empty((2, grid * grid))
    for p in range(grid * grid):
        if covariance == "fixed":
            cov = np.cov(flat_train[:, :, p], rowvar=False, ddof=1)
        else:
            cov = oas(flat_train[:, :, p])[0] * n / (n - 1)
        inverse = np.linalg.inv(cov + config.eps * np.eye(d))
        mean = flat_train[:, :, p].mean(axis=0)
        for b in range(2):
            distances[b, p] = mahalanobis(flat_test[b, :, p], mean, inverse)
    up = _bilinear_matrix(grid, 32)
    maxima = []
    for b in range(2):
        upsampled = up @ distances[b].reshape(grid, grid) @ up.T
        expected = gaussian_filter(upsampled, sigma=4.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(maps[b], expected, rtol=1e-4, atol=1e-4 * expected.max())
        maxima.append(expected.max())
    np.testing.assert_allclose(image_scores(torch.from_numpy(maps)).numpy(), maxima, rtol=1e-4)


def test_build_model_rejects_statistics_of_another_shape() -> None:
    config = PadimConfig(backbone="resnet18", weights="random", image_size=32, crop_size=32, channels=5)
    acc = GaussianAccumulator(8 * 8, 6)
    acc.update(torch.randn(3, 6, 8, 8))
    with pytest.raises(ValueError, match="the configuration needs P=64, d=5"):
        build_model(config, acc, weights_sha256="random:0")
