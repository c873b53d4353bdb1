"""Multi-scale embeddings and channel reduction against a reference written here."""

from __future__ import annotations

import pytest
import torch

from padim.core.config import PadimConfig
from padim.core.embedding import (
    EmbeddingProjector,
    build_projector,
    select_channel_indices,
    semi_orthogonal_projection,
)
from padim.core.geometry import new_projector
from padim.errors import ConfigError

STAGES = (24, 40, 112)  # EfficientNet-Lite0 taps
TOTAL = sum(STAGES)


def nearest_upsample(feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize by explicit index arithmetic (PyTorch's ``floor(i * in / out)`` rule)."""
    h_in, w_in = feature.shape[-2:]
    rows = torch.tensor([(i * h_in) // size[0] for i in range(size[0])])
    cols = torch.tensor([(j * w_in) // size[1] for j in range(size[1])])
    return feature[:, :, rows][:, :, :, cols]


def reference_embedding(features: list[torch.Tensor], indices: torch.Tensor | None) -> torch.Tensor:
    """Concatenate the upsampled full maps, then select channels (the paper's order of operations)."""
    size = (features[0].shape[-2], features[0].shape[-1])
    full = torch.cat([nearest_upsample(f, size) for f in features], dim=1)
    return full if indices is None else full.index_select(1, indices)


def random_features(sizes: tuple[int, int, int], batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Random tapped maps with the given spatial sides."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=generator) for c, s in zip(STAGES, sizes, strict=True)]


def test_integer_factor_reference_is_block_repetition() -> None:
    feature = torch.arange(8.0).reshape(1, 2, 2, 2)
    expected = feature.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(nearest_upsample(feature, (4, 4)), expected)


@pytest.mark.parametrize("sizes", [(16, 8, 4), (25, 13, 7)])  # 64 px input; 100 px (uneven strides)
@pytest.mark.parametrize("seed", [0, 3])
def test_per_stage_selection_equals_select_after_concatenation(sizes: tuple[int, int, int], seed: int) -> None:
    indices = select_channel_indices(TOTAL, 50, seed)
    projector = EmbeddingProjector(STAGES, indices=indices)
    features = random_features(sizes, seed=seed)
    embedding = projector(features)
    assert embedding.shape == (2, 50, sizes[0], sizes[0])
    assert torch.equal(embedding, reference_embedding(features, indices))


def test_indices_confined_to_one_stage_and_whole_stages() -> None:
    features = random_features((16, 8, 4))
    for indices in (torch.arange(30, 50), torch.arange(0, 64), torch.tensor([0, 23, 24, 63, 64, 175])):
        embedding = EmbeddingProjector(STAGES, indices=indices)(features)
        assert torch.equal(embedding, reference_embedding(features, indices))


def test_unsorted_or_repeated_indices_keep_their_order() -> None:
    # An artifact may carry indices in any order; the embedding must follow that order.
    features = random_features((16, 8, 4))
    for indices in (torch.tensor([150, 3, 60, 30]), torch.tensor([5, 5, 100]), torch.arange(23, -1, -1)):
        embedding = EmbeddingProjector(STAGES, indices=indices)(features)
        assert torch.equal(embedding, reference_embedding(features, indices))


def test_all_channels_is_the_plain_concatenation() -> None:
    features = random_features((16, 8, 4))
    projector = build_projector(STAGES, TOTAL, "all", seed=0)
    assert projector.out_channels == TOTAL
    assert torch.equal(projector(features), reference_embedding(features, None))


def test_seeded_indices_are_reproducible_sorted_and_unique() -> None:
    first = select_channel_indices(TOTAL, 100, seed=7)
    again = select_channel_indices(TOTAL, 100, seed=7)
    other = select_channel_indices(TOTAL, 100, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.dtype == torch.int64 and first.shape == (100,)
    assert bool((first[1:] > first[:-1]).all())  # strictly increasing: sorted and no repeats
    assert int(first.min()) >= 0 and int(first.max()) < TOTAL
    # The model's projector for a configuration carries exactly these indices.
    projector = new_projector(PadimConfig(channels=100, seed=7))
    assert torch.equal(projector.indices, first)


def test_semi_orthogonal_projection_has_orthonormal_columns() -> None:
    w = semi_orthogonal_projection(TOTAL, 40, seed=1)
    assert w.shape == (TOTAL, 40) and w.dtype == torch.float32
    torch.testing.assert_close(w.T @ w, torch.eye(40), atol=1e-5, rtol=0)
    assert torch.equal(w, semi_orthogonal_projection(TOTAL, 40, seed=1))
    assert not torch.equal(w, semi_orthogonal_projection(TOTAL, 40, seed=2))


def test_semi_orthogonal_embedding_projects_the_concatenation() -> None:
    features = random_features((16, 8, 4))
    projector = build_projector(STAGES, 40, "semi_orthogonal", seed=1)
    w = semi_orthogonal_projection(TOTAL, 40, seed=1)
    full = reference_embedding(features, None)
    expected = (full.permute(0, 2, 3, 1) @ w).permute(0, 3, 1, 2)
    torch.testing.assert_close(projector(features), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [0, -1, TOTAL + 1])
def test_out_of_range_d_is_a_config_error(d: int) -> None:
    with pytest.raises(ConfigError, match=f"between 1 and {TOTAL}"):
        select_channel_indices(TOTAL, d, seed=0)
    with pytest.raises(ConfigError, match=f"between 1 and {TOTAL}"):
        semi_orthogonal_projection(TOTAL, d, seed=0)


def test_config_with_too_many_channels_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="between 1 and 176"):
        new_projector(PadimConfig(backbone="efficientnet_lite0", channels=177))
    assert new_projector(PadimConfig(backbone="resnet18", channels=448)).out_channels == 448


def test_unknown_selection_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown channel selection"):
        build_projector(STAGES, 10, "pca", seed=0)


def test_projector_validates_its_inputs() -> None:
    with pytest.raises(ValueError, match=r"lie in \[0, 176\)"):
        EmbeddingProjector(STAGES, indices=torch.tensor([0, 176]))
    with pytest.raises(ValueError, match="either channel indices or a projection"):
        EmbeddingProjector(STAGES, indices=torch.tensor([0]), projection=torch.zeros(TOTAL, 1))
    with pytest.raises(ValueError, match="176 rows"):
        EmbeddingProjector(STAGES, projection=torch.zeros(TOTAL - 1, 3))
    projector = EmbeddingProjector(STAGES, indices=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="expected 3 feature maps"):
        projector(random_features((16, 8, 4))[:2])
    wrong = random_features((16, 8, 4))
    wrong[1] = wrong[1][:, :39]
    with pytest.raises(ValueError, match="40"):
        projector(wrong)


@pytest.mark.parametrize("method", ["random", "all"])
def test_selected_stages_upsample_to_the_embedding(method: str) -> None:
    projector = build_projector(STAGES, 100 if method == "random" else TOTAL, method, seed=3)
    features = [f.contiguous(memory_format=torch.channels_last) for f in random_features((16, 8, 4), batch=3)]
    expected = reference_embedding(features, projector.indices)
    for out in (None, [torch.empty(3, s, s, c) for s, c in zip((16, 8, 4), projector.stage_counts(), strict=True)]):
        stages = projector.select_stages(features, out=out)
        upsampled = torch.cat([nearest_upsample(m, (16, 16)) for m in stages], dim=1)
        assert torch.equal(upsampled, expected)
        assert all(m.is_contiguous(memory_format=torch.channels_last) for m in stages)
    with pytest.raises(ValueError, match="output tensors"):
        projector.select_stages(features, out=[torch.empty(3, 16, 16, 12)])


def test_a_projection_has_no_stage_channels() -> None:
    projector = build_projector(STAGES, 30, "semi_orthogonal", seed=3)
    with pytest.raises(ValueError, match="mixes"):
        projector.select_stages(random_features((16, 8, 4)))


def test_extractor_stage_maps_reuse_their_buffers_correctly() -> None:
    from padim.core.backbones import get_backbone
    from padim.core.features import FeatureExtractor

    backbone = get_backbone("resnet18", "random", "cpu")
    extractor = FeatureExtractor(backbone, build_projector((64, 128, 256), 40, "random", seed=1))
    images = torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for batch in (images, images[:5]):  # a smaller batch after a larger one reuses the buffers
        stages = [m.clone() for m in extractor.stage_maps(batch)]
        assert all(m.shape[0] == batch.shape[0] for m in stages)
        upsampled = torch.cat([nearest_upsample(m, (8, 8)) for m in stages], dim=1)
        torch.testing.assert_close(upsampled, extractor(batch), rtol=0, atol=0)
