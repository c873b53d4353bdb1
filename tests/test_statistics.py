"""Streaming per-position Gaussian statistics against numpy and scikit-learn.

The data sit far from the origin (mean 1e4, scale 1) so that a sum-of-squares formula, which
cancels catastrophically there, could not pass the 1e-9 relative comparisons against
``numpy.cov(ddof=1)`` (the test shows that it would not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.covariance import OAS, oas

from padim.core.covariance import oas_shrink
from padim.core.mahalanobis import whitening_from_accumulator
from padim.core.statistics import GaussianAccumulator
from padim.core.update_buffer import UpdateBuffer
from padim.errors import PadimError

P_SIDE = 3  # 3 x 3 grid -> 9 positions
P = P_SIDE * P_SIDE
D = 5
N = 40
OFFSET = 1.0e4
RTOL = 1e-9


def make_data(n: int = N, seed: int = 0, offset: float = OFFSET) -> np.ndarray:
    """Random embeddings ``(n, d, H, W)`` with a per-position, per-channel mean near ``offset``."""
    rng = np.random.default_rng(seed)
    centres = offset + rng.normal(size=(1, D, P_SIDE, P_SIDE)) * 10.0
    mixing = rng.normal(size=(D, D))
    noise = np.einsum("ij,njhw->nihw", mixing, rng.normal(size=(n, D, P_SIDE, P_SIDE)))
    return centres + noise


def numpy_reference(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean ``(P, d)`` and ``numpy.cov(ddof=1)`` ``(P, d, d)``."""
    flat = data.reshape(data.shape[0], D, P)
    means = np.stack([flat[:, :, p].mean(axis=0) for p in range(P)])
    covs = np.stack([np.cov(flat[:, :, p], rowvar=False, ddof=1) for p in range(P)])
    return means, covs


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest error relative to the largest magnitude of the expected value, per position."""
    actual = np.asarray(actual, dtype=np.float64).reshape(P, -1)
    expected = np.asarray(expected, dtype=np.float64).reshape(P, -1)
    return float((np.abs(actual - expected).max(axis=1) / np.abs(expected).max(axis=1)).max())


def accumulate(data: np.ndarray, batch: int) -> GaussianAccumulator:
    """Fold ``data`` into a fresh accumulator in batches of ``batch``."""
    acc = GaussianAccumulator(P, D)
    for start in range(0, data.shape[0], batch):
        acc.update(torch.from_numpy(data[start : start + batch]))
    return acc


def copy_of(acc: GaussianAccumulator) -> GaussianAccumulator:
    """Deep copy through the state dict (merge mutates in place)."""
    return GaussianAccumulator.from_state_dict({k: v.clone() for k, v in acc.state_dict().items()})


def test_mean_and_covariance_equal_numpy_with_large_offset() -> None:
    data = make_data()
    ref_mean, ref_cov = numpy_reference(data)
    acc = accumulate(data, batch=7)
    assert acc.n == N
    assert rel_err(acc.mean.numpy(), ref_mean) < RTOL
    np.testing.assert_allclose(acc.mean.numpy(), ref_mean, rtol=RTOL, atol=0)
    assert rel_err(acc.covariance().numpy(), ref_cov) < RTOL
    # The comparison is sensitive: the textbook sum-of-squares formula fails it on these data.
    flat = data.reshape(N, D, P).transpose(2, 0, 1)  # (P, n, d)
    naive = (np.einsum("pni,pnj->pij", flat, flat) - N * np.einsum("pi,pj->pij", ref_mean, ref_mean)) / (N - 1)
    assert rel_err(naive, ref_cov) > RTOL


def test_float32_input_is_promoted_before_arithmetic() -> None:
    data32 = make_data().astype(np.float32)
    ref_mean, ref_cov = numpy_reference(data32.astype(np.float64))
    acc = GaussianAccumulator(P, D)
    for start in range(0, N, 16):
        acc.update(torch.from_numpy(data32[start : start + 16]))
    assert acc.mean.dtype == torch.float64 and acc.m2.dtype == torch.float64
    assert rel_err(acc.covariance().numpy(), ref_cov) < RTOL
    np.testing.assert_allclose(acc.mean.numpy(), ref_mean, rtol=RTOL, atol=0)


def test_positions_first_layout_is_accepted() -> None:
    data = make_data()
    a = accumulate(data, batch=N)
    b = GaussianAccumulator(P, D)
    b.update(torch.from_numpy(data.reshape(N, D, P)))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.m2, b.m2)


@pytest.mark.parametrize("batch", [1, 7, N])
def test_batch_split_invariance(batch: int) -> None:
    data = make_data()
    ref_mean, ref_cov = numpy_reference(data)
    acc = accumulate(data, batch=batch)
    one_batch = accumulate(data, batch=N)
    assert acc.n == N
    assert rel_err(acc.covariance().numpy(), ref_cov) < RTOL
    np.testing.assert_allclose(acc.mean.numpy(), ref_mean, rtol=RTOL, atol=0)
    assert rel_err(acc.covariance().numpy(), one_batch.covariance().numpy()) < 1e-12


def test_shard_split_and_merge_order_invariance() -> None:
    data = make_data(n=45, seed=1)
    ref_mean, ref_cov = numpy_reference(data)
    # Uneven shards, each accumulated with a different batch size.
    a, b, c = accumulate(data[:4], 3), accumulate(data[4:30], 5), accumulate(data[30:], 15)

    ab = copy_of(a).merge(copy_of(b))
    ba = copy_of(b).merge(copy_of(a))
    assert ab.n == ba.n == 30
    ref_ab_mean, ref_ab_cov = numpy_reference(data[:30])
    for merged in (ab, ba):
        np.testing.assert_allclose(merged.mean.numpy(), ref_ab_mean, rtol=RTOL, atol=0)
        assert rel_err(merged.covariance().numpy(), ref_ab_cov) < RTOL

    trees = {
        "(a+b)+c": copy_of(a).merge(copy_of(b)).merge(copy_of(c)),
        "a+(b+c)": copy_of(a).merge(copy_of(b).merge(copy_of(c))),
        "(c+a)+b": copy_of(c).merge(copy_of(a)).merge(copy_of(b)),
        "b+(c+a)": copy_of(b).merge(copy_of(c).merge(copy_of(a))),
    }
    for name, merged in trees.items():
        assert merged.n == 45, name
        np.testing.assert_allclose(merged.mean.numpy(), ref_mean, rtol=RTOL, atol=0, err_msg=name)
        assert rel_err(merged.covariance().numpy(), ref_cov) < RTOL, name


def test_merge_with_empty_accumulator() -> None:
    data = make_data()
    full = accumulate(data, 8)
    left = copy_of(full).merge(GaussianAccumulator(P, D))
    right = GaussianAccumulator(P, D).merge(copy_of(full))
    for merged in (left, right):
        assert merged.n == N
        assert torch.equal(merged.mean, full.mean)
        assert torch.equal(merged.m2, full.m2)


def test_merge_rejects_other_shapes() -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        GaussianAccumulator(P, D).merge(GaussianAccumulator(P, D + 1))


@pytest.mark.parametrize(
    ("removed", "seed"), [(slice(0, 1), 2), (slice(3, 17), 3), (slice(25, 38), 4), (slice(2, 40, 3), 5)]
)
def test_subtract_leaves_the_statistics_of_the_other_images(removed: slice, seed: int) -> None:
    data = make_data(seed=seed)
    mask = np.zeros(N, dtype=bool)
    mask[removed] = True
    kept, gone = data[~mask], data[mask]
    ref_mean, ref_cov = numpy_reference(kept)
    full = accumulate(data, batch=7)
    remaining = full.copy().subtract(accumulate(gone, batch=4))
    assert remaining.n == len(kept)
    np.testing.assert_allclose(remaining.mean.numpy(), ref_mean, rtol=RTOL, atol=0)
    assert rel_err(remaining.covariance().numpy(), ref_cov) < RTOL
    assert full.n == N  # the copy is independent


def test_merge_then_subtract_gives_back_the_original() -> None:
    data = make_data(n=45, seed=6)
    original = accumulate(data[:30], 5)
    other = accumulate(data[30:], 15)
    restored = original.copy().merge(other).subtract(other)
    assert restored.n == original.n
    np.testing.assert_allclose(restored.mean.numpy(), original.mean.numpy(), rtol=RTOL, atol=0)
    assert rel_err(restored.m2.numpy(), original.m2.numpy()) < RTOL
    assert rel_err(restored.covariance().numpy(), numpy_reference(data[:30])[1]) < RTOL


def test_subtract_refuses_other_shapes_too_few_images_and_foreign_images() -> None:
    data = make_data()
    full = accumulate(data, 8)
    before = full.m2.clone()
    with pytest.raises(ValueError, match="cannot subtract statistics of shape"):
        full.subtract(GaussianAccumulator(P, D + 1))
    with pytest.raises(ValueError, match="fewer than 2 would remain"):
        full.subtract(accumulate(data[1:], 8))
    foreign = accumulate(make_data(n=10, seed=9, offset=-OFFSET), 5)  # far from every image in ``full``
    with pytest.raises(ValueError, match="negative variance"):
        full.subtract(foreign)
    assert full.n == N and torch.equal(full.m2, before)  # refused before any change
    assert full.subtract(GaussianAccumulator(P, D)) is full and full.n == N


def test_state_dict_round_trip_through_safetensors(tmp_path: Path) -> None:
    data = make_data()
    acc = accumulate(data[:25], 6)
    path = tmp_path / "statistics.safetensors"
    save_file(acc.state_dict(), str(path))
    restored = GaussianAccumulator.from_state_dict(load_file(str(path)))
    assert (restored.n, restored.num_positions, restored.dim) == (25, P, D)
    assert torch.equal(restored.mean, acc.mean) and torch.equal(restored.m2, acc.m2)
    # Continuing from the restored state equals never having stopped.
    acc.update(torch.from_numpy(data[25:]))
    restored.update(torch.from_numpy(data[25:]))
    assert torch.equal(restored.mean, acc.mean) and torch.equal(restored.m2, acc.m2)
    _, ref_cov = numpy_reference(data)
    assert rel_err(restored.covariance().numpy(), ref_cov) < RTOL


def test_from_state_dict_rejects_inconsistent_state() -> None:
    state = GaussianAccumulator(P, D).state_dict()
    with pytest.raises(PadimError, match="lacks tensor"):
        GaussianAccumulator.from_state_dict({"n": state["n"], "mean": state["mean"]})
    with pytest.raises(PadimError, match="inconsistent"):
        GaussianAccumulator.from_state_dict({**state, "m2": state["m2"][:, :, :-1]})


def _state_numel(acc: GaussianAccumulator) -> dict[str, int]:
    """Elements of every tensor the accumulator holds (its attributes and its state dict).

    The float64 work array of an update is bounded by the chunk budget (16 MB), whatever the
    number of images; it is checked on its own and left out here.
    """
    sizes = {f"state.{k}": v.numel() for k, v in acc.state_dict().items()}
    tensors = {k: v for k, v in vars(acc).items() if isinstance(v, torch.Tensor)}
    scratch = tensors.pop("_scratch_buffer", None)
    assert scratch is None or scratch.numel() * 8 <= 16 << 20
    sizes.update({f"attr.{k}": v.numel() for k, v in tensors.items()})
    return sizes


def test_memory_is_independent_of_the_number_of_images() -> None:
    small = accumulate(make_data(n=3), 3)
    large = accumulate(make_data(n=120, seed=3), 50)
    assert _state_numel(small) == _state_numel(large)
    assert _state_numel(large)["state.m2"] == P * D * D
    # The state dict: n (1) + mean + m2. The attributes (n is a plain int there): the shift and
    # the shifted sum (P x d each) and the co-moment (P x d x d).
    assert sum(_state_numel(large).values()) == (1 + P * D + P * D * D) + (2 * P * D + P * D * D)


def test_finalize_adds_eps_on_the_diagonal_exactly_once() -> None:
    data = make_data()
    _, ref_cov = numpy_reference(data)
    acc = accumulate(data, 9)
    eps = 0.25
    estimate = acc.finalize(eps=eps)
    assert estimate.n == N
    assert estimate.mean.shape == (P, D) and estimate.covariance.shape == (P, D, D)
    assert rel_err(estimate.covariance.numpy(), ref_cov + eps * np.eye(D)) < RTOL
    # Finalising does not modify the state: a second call gives the same, not 2 * eps.
    again = acc.finalize(eps=eps)
    assert torch.equal(again.covariance, estimate.covariance)
    difference = (estimate.covariance - acc.finalize(eps=0.0).covariance).numpy()
    np.testing.assert_allclose(difference, np.broadcast_to(eps * np.eye(D), difference.shape), atol=1e-9)
    # covariance(eps=...) and the chunked whitening path regularise the same way, once.
    np.testing.assert_allclose(acc.covariance(eps=eps).numpy(), estimate.covariance.numpy(), rtol=0, atol=0)
    factor = whitening_from_accumulator(acc, eps, dtype=torch.float64, chunk=4)
    identity = factor @ estimate.covariance @ factor.transpose(1, 2)
    np.testing.assert_allclose(identity.numpy(), np.broadcast_to(np.eye(D), identity.shape), atol=1e-9)


def test_oas_matches_sklearn_in_unbiased_scale() -> None:
    n = 12  # few samples: the OAS intensity is well inside (0, 1)
    data = make_data(n=n, seed=4)
    flat = data.reshape(n, D, P)
    acc = accumulate(data, 5)
    eps = 0.01
    estimate = acc.finalize(eps=eps, shrinkage="oas")
    for p in range(P):
        shrunk, intensity = oas(flat[:, :, p])
        assert 0.0 < intensity < 1.0
        estimator = OAS().fit(flat[:, :, p])
        np.testing.assert_allclose(estimator.covariance_, shrunk, rtol=1e-12)
        expected = shrunk * n / (n - 1) + eps * np.eye(D)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(estimate.covariance[p].numpy(), expected, rtol=1e-9, atol=1e-9 * scale)
    # oas_shrink itself: unbiased in, unbiased out.
    direct = oas_shrink(acc.covariance(), n)
    np.testing.assert_allclose((direct[0] * (n - 1) / n).numpy(), oas(flat[:, :, 0])[0], rtol=1e-9)


def test_unknown_shrinkage_is_rejected() -> None:
    acc = accumulate(make_data(), N)
    with pytest.raises(ValueError, match="unknown covariance estimator"):
        acc.finalize(shrinkage="ledoit_wolf")


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_images_is_a_clear_error(n: int) -> None:
    acc = GaussianAccumulator(P, D)
    if n:
        acc.update(torch.from_numpy(make_data(n=n)))
    for call in (
        lambda: acc.finalize(),
        lambda: acc.covariance(),
        lambda: acc.finalize(shrinkage="oas"),
        lambda: whitening_from_accumulator(acc, eps=0.01),
    ):
        with pytest.raises(PadimError, match="at least 2 training images"):
            call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_rejected_without_touching_the_state(bad: float) -> None:
    data = make_data()
    acc = accumulate(data[:10], 10)
    mean, m2 = acc.mean.clone(), acc.m2.clone()
    batch = torch.from_numpy(data[10:14].copy())
    batch[2, 1, 0, 2] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        acc.update(batch)
    assert acc.n == 10 and torch.equal(acc.mean, mean) and torch.equal(acc.m2, m2)


def test_wrong_shape_is_rejected() -> None:
    acc = GaussianAccumulator(P, D)
    with pytest.raises(ValueError, match="expected embeddings of shape"):
        acc.update(torch.zeros(2, D + 1, P_SIDE, P_SIDE))
    with pytest.raises(ValueError, match="expected embeddings of shape"):
        acc.update(torch.zeros(2, D, P_SIDE, P_SIDE + 1))


@pytest.mark.parametrize(
    ("batch", "budget_images"),
    [(4, 10), (7, 10), (10, 10), (3, 40), (12, 5)],  # partial fills, exact fills, buffer bigger than all, too small
)
def test_update_buffer_gives_numpy_statistics(batch: int, budget_images: int) -> None:
    data = make_data()
    per_image = P * D * 8  # float64 rows
    acc = GaussianAccumulator(P, D)
    buffer = UpdateBuffer(acc, budget_bytes=budget_images * per_image)
    folded = []
    for start in range(0, N, batch):
        buffer.add(torch.from_numpy(data[start : start + batch]))
        folded.append(acc.n)
        assert acc.n + buffer.pending == min(start + batch, N)  # nothing lost, nothing counted twice
    if budget_images > batch:
        assert min(folded) < N  # images really were held back (the buffer was in use)
    buffer.flush()
    assert acc.n == N and buffer.pending == 0
    means, covs = numpy_reference(data)
    assert rel_err(acc.mean.numpy(), means) < RTOL
    assert rel_err(acc.covariance().numpy(), covs) < RTOL


def test_update_buffer_validates_before_holding() -> None:
    buffer = UpdateBuffer(GaussianAccumulator(P, D))
    with pytest.raises(ValueError):
        buffer.add(torch.zeros(2, D + 1, P_SIDE, P_SIDE))
    assert buffer.pending == 0
