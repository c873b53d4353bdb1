"""Anomaly maps: Gaussian kernel, blur against scipy, bilinear upsampling, image score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from padim.core.anomaly_map import AnomalyMapGenerator, gaussian_kernel1d, image_scores
from padim.core.config import PadimConfig


def test_kernel_for_sigma_4_has_33_taps_and_sums_to_one() -> None:
    kernel = gaussian_kernel1d(4.0)
    assert kernel.shape == (33,)
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
    x = np.arange(33) - 16.0
    expected = np.exp(-(x**2) / 32.0)
    np.testing.assert_allclose(kernel.numpy(), expected / expected.sum(), rtol=1e-6)
    assert int(kernel.argmax()) == 16


@pytest.mark.parametrize(("sigma", "size"), [(1.0, 9), (2.5, 21)])
def test_kernel_length_follows_the_scipy_radius(sigma: float, size: int) -> None:
    # scipy's radius int(truncate * sigma + 0.5) with truncate = 4: 4 and 10.
    assert gaussian_kernel1d(sigma).shape == (size,)


def test_kernel_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        gaussian_kernel1d(0.0)
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel1d(1.0, size=8)


def test_blur_equals_scipy_gaussian_filter_in_mirror_mode() -> None:
    # torch's F.pad(mode="reflect") does not repeat the edge sample: scipy calls that "mirror".
    rng = np.random.default_rng(0)
    maps = rng.random((2, 40, 52)).astype(np.float32)  # non-square: catches swapped axes
    blurred = AnomalyMapGenerator(output_size=40, sigma=4.0).blur(torch.from_numpy(maps).unsqueeze(1)).squeeze(1)
    for b in range(2):
        expected = gaussian_filter(maps[b].astype(np.float64), sigma=4.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(blurred[b].numpy(), expected, atol=1e-5)
        # The comparison tells the padding modes apart.
        other = gaussian_filter(maps[b].astype(np.float64), sigma=4.0, mode="reflect", truncate=4.0)
        assert np.abs(blurred[b].numpy() - other).max() > 1e-3


def _bilinear_profile(n_in: int, n_out: int, index: int) -> np.ndarray:
    """Weight of input sample ``index`` in each output sample (half-pixel centres, edge clamped)."""
    source = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    source = np.clip(source, 0.0, n_in - 1)
    return np.maximum(0.0, 1.0 - np.abs(source - index))


def test_upsampling_is_bilinear_with_half_pixel_centres() -> None:
    distances = torch.zeros(1, 8, 8)
    distances[0, 2, 5] = 1.0
    generator = AnomalyMapGenerator(output_size=32, sigma=0.0)
    upsampled = generator(distances)[0].numpy()
    expected = np.outer(_bilinear_profile(8, 32, 2), _bilinear_profile(8, 32, 5))
    np.testing.assert_allclose(upsampled, expected, atol=1e-6)
    # The peak straddles the centre of input cell (2, 5): output rows 9-10, columns 21-22.
    rows, cols = np.nonzero(upsampled == upsampled.max())
    assert set(rows) == {9, 10} and set(cols) == {21, 22}


def test_constant_map_stays_constant() -> None:
    generator = AnomalyMapGenerator(output_size=64, sigma=4.0)
    maps = generator(torch.full((2, 16, 16), 3.25))
    assert maps.shape == (2, 64, 64) and maps.dtype == torch.float32
    np.testing.assert_allclose(maps.numpy(), 3.25, rtol=1e-6)


def test_blurred_delta_peaks_where_the_patch_is() -> None:
    distances = torch.zeros(1, 16, 16, dtype=torch.float64)
    distances[0, 5, 10] = 2.0
    maps = AnomalyMapGenerator(output_size=64, sigma=4.0)(distances)[0]
    # Patch (5, 10) of a stride-4 grid covers rows 20-23 and columns 40-43.
    row, col = divmod(int(maps.argmax()), 64)
    assert row in (21, 22) and col in (41, 42)
    total = maps.sum()
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    assert float((maps * ys).sum() / total) == pytest.approx(21.5, abs=0.05)
    assert float((maps * xs).sum() / total) == pytest.approx(41.5, abs=0.05)


def test_forward_equals_scipy_composition() -> None:
    rng = np.random.default_rng(1)
    distances = rng.random((1, 14, 14)) * 5.0
    maps = AnomalyMapGenerator(output_size=56, sigma=4.0)(torch.from_numpy(distances))[0].numpy()
    profile = np.stack([_bilinear_profile(14, 56, i) for i in range(14)])  # (14 in, 56 out)
    upsampled = profile.T @ distances[0] @ profile
    expected = gaussian_filter(upsampled, sigma=4.0, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(maps, expected, atol=1e-5)


def test_image_score_is_the_maximum_of_the_map() -> None:
    maps = torch.zeros(3, 10, 10)
    maps[0, 3, 4] = 7.0
    maps[1] = -1.0
    maps[1, 9, 0] = -0.5
    maps[2, 0, 9] = 2.0
    maps[2, 5, 5] = 1.5
    assert image_scores(maps).tolist() == [7.0, -0.5, 2.0]


def test_smallest_input_with_the_default_blur_works() -> None:
    maps = AnomalyMapGenerator(output_size=32, sigma=4.0)(torch.rand(2, 8, 8))
    assert maps.shape == (2, 32, 32) and torch.isfinite(maps).all()


def test_blur_wider_than_the_input_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="blur_sigma"):
        PadimConfig(image_size=32, crop_size=32, blur_sigma=8.0)
    assert PadimConfig(image_size=64, crop_size=64, blur_sigma=8.0).blur_sigma == 8.0


@pytest.mark.parametrize(("grid", "output", "sigma"), [((56, 56), 224, 4.0), ((13, 21), 96, 2.5), ((7, 7), 32, 0.0)])
def test_separable_operator_equals_the_step_by_step_maps(grid: tuple[int, int], output: int, sigma: float) -> None:
    # The fast path (one matrix per axis) against interpolation followed by the two blur passes.
    generator = AnomalyMapGenerator(output_size=output, sigma=sigma)
    distances = torch.rand(3, *grid, generator=torch.Generator().manual_seed(2)) * 10.0
    fast = generator(distances)
    reference = generator.reference(distances)
    assert fast.shape == reference.shape == (3, output, output)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
