"""Backbones: real offline ImageNet weights, an exact timm mapping, truncation, safe weight files.

Nothing here touches the network: the ResNet download is replaced by a function that raises, and
the torch hub cache points at an empty temporary folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torchvision.models import resnet18

from padim.core.backbones import BACKBONES, Backbone, get_spec, load_backbone, map_state_dict
from padim.core.backbones.efficientnet import PACKAGE_SHA256, TIMM_NAME, package_weights_path
from padim.core.backbones.weights import load_weights_file
from padim.errors import ConfigError, WeightsUnavailableError

EXPECTED_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    """The default backbone with its packaged ImageNet weights."""
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0_raw_state() -> dict[str, torch.Tensor]:
    """The packaged checkpoint as stored (original-port naming)."""
    return torch.load(package_weights_path(), map_location="cpu", weights_only=True)


def test_packaged_lite0_file_is_the_official_checkpoint() -> None:
    path = Path(package_weights_path())
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == EXPECTED_LITE0_SHA256
    assert PACKAGE_SHA256 == EXPECTED_LITE0_SHA256


def test_default_backbone_has_trained_batch_norm_statistics(lite0: Backbone) -> None:
    assert lite0.spec.name == "efficientnet_lite0"
    assert lite0.weights_sha256 == EXPECTED_LITE0_SHA256
    norms = [m for m in lite0.network.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) >= 10
    for norm in norms:  # every layer, not just some: freshly initialised would be 1 and 0
        assert not torch.all(norm.running_var == 1.0)
        assert not torch.all(norm.running_mean == 0.0)


def test_mapping_onto_timm_is_exact_and_complete(lite0_raw_state: dict[str, torch.Tensor]) -> None:
    mapped = map_state_dict(lite0_raw_state)
    reference = timm.create_model(TIMM_NAME, pretrained=False)
    expected_keys = set(reference.state_dict())
    assert len(lite0_raw_state) == len(mapped) == len(expected_keys) == 296
    assert set(mapped) == expected_keys
    # The checkpoint carries num_batches_tracked for each of the 49 batch norms; it is mapped too.
    assert sum(k.endswith("num_batches_tracked") for k in mapped) == 49
    result = reference.load_state_dict(mapped, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    # Hand-checked renames: stage-0 depthwise-separable block, inverted residuals, stem and head.
    renames = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.running_mean": "blocks.0.0.bn2.running_mean",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.2._bn1.weight": "blocks.1.1.bn2.weight",
        "_blocks.3._project_conv.weight": "blocks.2.0.conv_pwl.weight",
        "_blocks.10._bn0.bias": "blocks.4.2.bn1.bias",
        "_blocks.15._bn2.running_var": "blocks.6.0.bn3.running_var",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.weight": "bn2.weight",
        "_fc.bias": "classifier.bias",
    }
    for source, target in renames.items():
        assert torch.equal(mapped[target], lite0_raw_state[source]), source
    # A state dict already in timm naming passes through.
    assert set(map_state_dict(mapped)) == expected_keys


def test_mapping_rejects_unknown_keys(lite0_raw_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="unexpected"):
        map_state_dict({**lite0_raw_state, "_blocks.3._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        map_state_dict({**lite0_raw_state, "_mystery.weight": torch.zeros(1)})


def test_truncated_network_equals_timm_features_only(lite0: Backbone, lite0_raw_state: dict[str, torch.Tensor]) -> None:
    reference = timm.create_model(TIMM_NAME, pretrained=False, features_only=True, out_indices=(1, 2, 3))
    result = reference.load_state_dict(map_state_dict(lite0_raw_state), strict=False)
    assert result.missing_keys == []
    assert {k.split(".")[0] for k in result.unexpected_keys} == {"conv_head", "bn2", "classifier"}
    reference.eval()
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = lite0.network(images)
        theirs = reference(images)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        # Ours runs channels-last (other convolution kernels, other summation order): float32 noise.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_lite0_tap_shapes_at_224(lite0: Backbone) -> None:
    with torch.inference_mode():
        features = lite0.network(torch.zeros(1, 3, 224, 224))
    assert [tuple(f.shape[1:]) for f in features] == [(24, 56, 56), (40, 28, 28), (112, 14, 14)]
    assert lite0.spec.channels == (24, 40, 112) and lite0.spec.strides == (4, 8, 16)
    assert lite0.spec.mean == lite0.spec.std == (0.5, 0.5, 0.5)


def test_truncated_network_has_no_later_stages(lite0: Backbone) -> None:
    names = [name for name, _ in lite0.network.named_parameters()]
    stages = {int(name.split(".")[1]) for name in names if name.startswith("blocks.")}
    assert stages == {0, 1, 2, 3, 4}
    assert not any(name.startswith(("conv_head", "bn2", "classifier", "blocks.5", "blocks.6")) for name in names)
    full = timm.create_model(TIMM_NAME, pretrained=False)
    kept = sum(p.numel() for p in lite0.network.parameters())
    assert kept < 0.5 * sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_backbone_is_frozen_in_eval_mode(name: str, lite0: Backbone) -> None:
    backbone = lite0 if name == "efficientnet_lite0" else load_backbone(name, weights="random")
    assert all(not module.training for module in backbone.network.modules())
    assert all(not p.requires_grad for p in backbone.network.parameters())


@pytest.mark.parametrize(("name", "channels"), [("resnet18", (64, 128, 256)), ("wide_resnet50_2", (256, 512, 1024))])
def test_random_resnets_shapes_and_determinism(name: str, channels: tuple[int, ...]) -> None:
    torch.manual_seed(1234)
    before = torch.rand(3)
    torch.manual_seed(1234)
    first = load_backbone(name, weights="random")
    after = torch.rand(3)
    assert torch.equal(before, after)  # building the seeded network leaves the caller's RNG alone
    second = load_backbone(name, weights="random")
    assert first.weights_sha256 == "random:0"
    one, two = first.network.state_dict(), second.network.state_dict()
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not any(k.startswith(("layer4", "fc")) for k in one)
    with torch.inference_mode():
        features = first.network(torch.randn(1, 3, 32, 32))
    expected = [(c, 32 // stride, 32 // stride) for c, stride in zip(channels, (4, 8, 16), strict=True)]
    assert [tuple(f.shape[1:]) for f in features] == expected
    assert sum(channels) == BACKBONES[name].total_channels == (448 if name == "resnet18" else 1792)
    assert BACKBONES[name].default_channels == (100 if name == "resnet18" else 550)


def test_offline_resnet_without_weights_file_says_how_to_provide_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    calls: list[str] = []

    def no_network(url: str, dst: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("resnet18")
    message = str(info.value)
    assert calls == ["https://download.pytorch.org/models/resnet18-f37072fd.pth"]
    assert "--weights" in message and "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints") in message
    assert not any((tmp_path / "torch-home").rglob("*.pth"))


def _random_resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    network = resnet18(weights=None)
    with torch.no_grad():  # make batch-norm statistics distinct from any fresh init
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return network.state_dict()


def test_local_weights_file_is_loaded_and_identified(tmp_path: Path) -> None:
    state = _random_resnet18_state(seed=7)
    path = tmp_path / "my-resnet18.pth"
    torch.save(state, path)
    backbone = load_backbone("resnet18", weights=str(path))
    assert backbone.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert backbone.weights_source == str(path)
    loaded = backbone.network.state_dict()
    for key in ("conv1.weight", "layer1.0.bn1.running_var", "layer3.1.conv2.weight"):
        assert torch.equal(loaded[key], state[key]), key
    random = load_backbone("resnet18", weights="random").network.state_dict()
    assert not torch.equal(loaded["conv1.weight"], random["conv1.weight"])


def test_weights_file_with_wrong_digest_or_shape_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pth"
    torch.save(_random_resnet18_state(seed=1), path)
    with pytest.raises(WeightsUnavailableError, match="expected deadbeef"):
        load_weights_file(str(path), expected_sha256="deadbeef")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(WeightsUnavailableError, match="does not fit resnet18"):
        load_backbone("resnet18", weights=str(wrong))
    with pytest.raises(WeightsUnavailableError, match="not found"):
        load_backbone("resnet18", weights=str(tmp_path / "absent.pth"))


class _Payload:
    """An object whose unpickling would run code (it creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def test_weights_file_with_pickled_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    state: dict[str, object] = dict(_random_resnet18_state(seed=2))
    state["payload"] = _Payload(marker)
    torch.save(state, path)
    with pytest.raises(WeightsUnavailableError, match=r"not a weights file: .*Python objects"):
        load_backbone("resnet18", weights=str(path))
    assert not marker.exists()
    plain = tmp_path / "not-tensors.pth"
    torch.save({"conv1.weight": torch.zeros(1), "epoch": 3}, plain)
    with pytest.raises(WeightsUnavailableError, match="not a state dict of tensors"):
        load_backbone("resnet18", weights=str(plain))


def test_unknown_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'vgg16'"):
        get_spec("vgg16")
    with pytest.raises(ConfigError):
        load_backbone("vgg16")


@pytest.mark.parametrize(
    ("name", "weights"), [("efficientnet_lite0", None), ("resnet18", "random"), ("wide_resnet50_2", "random")]
)
def test_batch_norms_folded_into_the_convolutions_give_the_same_taps(name: str, weights: str | None) -> None:
    from padim.core.backbones.folding import fold_batch_norms

    backbone = load_backbone(name, weights, runtime="torch")
    before = {k: v.clone() for k, v in backbone.network.state_dict().items()}
    folded = fold_batch_norms(backbone.network)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.network.modules())  # the original is untouched
    assert all(torch.equal(before[k], v) for k, v in backbone.network.state_dict().items())
    images = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(13))
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected, got = backbone.network(images), backbone.tap(images)
    for a, b in zip(got, expected, strict=True):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
