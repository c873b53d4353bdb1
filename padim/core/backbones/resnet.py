"""torchvision ResNet18 and WideResNet50-2 truncated after ``layer3`` (the paper's backbones)."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18, wide_resnet50_2

WEIGHT_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "wide_resnet50_2": "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
}
# torchvision encodes the first hex digits of each file's sha256 in its name.
WEIGHT_SHA256_PREFIX = {"resnet18": "f37072fd", "wide_resnet50_2": "95faca4d"}


def build_resnet(name: str) -> nn.Module:
    """Build a torchvision ResNet with uninitialised (random) weights.

    Args:
        name: ``"resnet18"`` or ``"wide_resnet50_2"``.

    Returns:
        The full torchvision network.
    """
    builders = {"resnet18": resnet18, "wide_resnet50_2": wide_resnet50_2}
    return builders[name](weights=None)


class TruncatedResNet(nn.Module):
    """ResNet stem and ``layer1..layer3``; ``layer4`` and the classifier are dropped.

    Args:
        network: A torchvision ResNet.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.conv1 = network.conv1
        self.bn1 = network.bn1
        self.relu = network.relu
        self.maxpool = network.maxpool
        self.layer1 = network.layer1
        self.layer2 = network.layer2
        self.layer3 = network.layer3

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Run the truncated network.

        Args:
            images: Normalised images, shape ``(B, 3, H, W)``.

        Returns:
            ``[layer1, layer2, layer3]`` outputs, strides 4, 8 and 16.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3]
