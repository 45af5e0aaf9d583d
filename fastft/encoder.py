"""The encoder: a torchvision ResNet backbone (classifier removed) followed by MoCo's projection head."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torchvision

from .config import ModelConfig


def build_backbone(arch: str, small_stem: bool = False,
                   norm_layer: Callable[[int], nn.Module] | None = None) -> tuple[nn.Module, int]:
    """A torchvision ResNet with `fc` replaced by Identity, and its feature width.

    Keeping torchvision's module names means the backbone's state dict is a torchvision state dict minus `fc`
    (`norm_layer`, e.g. split_bn.SplitBatchNorm, must keep BatchNorm2d's state dict for that).
    """
    net = getattr(torchvision.models, arch)(weights=None, norm_layer=norm_layer)
    width = net.fc.in_features
    if small_stem:
        # For 32x32-ish inputs: a 7x7/2 conv plus max-pool would leave almost nothing to the residual stages.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, width


def build_head(cfg: ModelConfig, width: int) -> nn.Module:
    if cfg.head == "linear":  # MoCo v1
        return nn.Linear(width, cfg.dim)
    hidden = cfg.mlp_hidden or width  # MoCo v2: hidden = backbone width (2048 for ResNet-50)
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cfg.dim))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.backbone, self.width = build_backbone(cfg.arch, cfg.small_stem, norm_layer)
        self.head = build_head(cfg, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
