"""Batch-norm folded into the convolutions before it, for the torch runtime.

In eval mode a batch norm is a per-channel affine map, so ``bn(conv(x))`` equals one convolution with
scaled weights and a shifted bias. torch runs them as separate kernels (a profile of the truncated
EfficientNet-Lite0 on 2 CPU cores showed about a fifth of the network's time in batch-norm calls),
and timm's TF-"same" padding defeats ``torch.fx``, so its fuser cannot do this: the pairs are folded
here by name. OpenVINO fuses them itself.

:func:`fold_batch_norms` returns a folded *copy*: the original module (its weights, its running
statistics) stays as loaded.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "TruncatedEfficientNet": (("conv_stem", "bn1"),),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "TruncatedResNet": (("conv1", "bn1"),),
}
"""(convolution, batch norm) attribute pairs of each module type, in forward order."""


def fold_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Fold an eval-mode batch norm into the convolution before it (in place).

    Args:
        conv: The convolution; gains a bias if it had none.
        norm: The batch norm applied to the convolution's output (running statistics used).
    """
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError("a batch norm without running statistics cannot be folded")
    with torch.no_grad():
        scale = (
            norm.weight / torch.sqrt(norm.running_var + norm.eps)
            if norm.affine
            else torch.rsqrt(norm.running_var + norm.eps)
        )
        shift = norm.bias if norm.affine else torch.zeros_like(scale)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        conv.weight.mul_(scale.reshape(-1, *([1] * (conv.weight.ndim - 1))))
        folded_bias = shift + (bias - norm.running_mean) * scale
        conv.bias = nn.Parameter(folded_bias, requires_grad=False)


def _after_fold(norm: nn.Module) -> nn.Module:
    """What replaces a folded batch norm: its activation for timm's ``BatchNormAct2d``, else nothing."""
    activation = getattr(norm, "act", None)
    dropout = getattr(norm, "drop", None)
    if activation is None:
        return nn.Identity()
    return nn.Sequential(dropout, activation) if dropout is not None else activation


def fold_batch_norms(network: nn.Module) -> nn.Module:
    """A copy of a truncated backbone with every batch norm folded into its convolution.

    Args:
        network: A :class:`~padim.core.backbones.efficientnet.TruncatedEfficientNet` or
            :class:`~padim.core.backbones.resnet.TruncatedResNet` in eval mode.

    Returns:
        The folded copy (eval mode, gradients off). Its outputs equal the original's to float32
        rounding (tested at 1e-5 relative).
    """
    folded = copy.deepcopy(network)
    folded.eval()
    for module in folded.modules():
        pairs = list(_PAIRS.get(type(module).__name__, ()))
        if isinstance(module, (BasicBlock, Bottleneck)):
            pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(module, f"conv{i}")]
            downsample = module.downsample
            if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
                fold_into(downsample[0], downsample[1])
                downsample[1] = nn.Identity()
        for conv_name, norm_name in pairs:
            conv, norm = getattr(module, conv_name), getattr(module, norm_name)
            if isinstance(norm, nn.BatchNorm2d):
                fold_into(conv, norm)
                setattr(module, norm_name, _after_fold(norm))
    remaining = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if remaining:
        raise ValueError(f"batch norms left unfolded: {remaining[:5]}")
    return folded.requires_grad_(False)
