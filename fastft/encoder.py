"""The encoder: a torchvision ResNet backbone (classifier removed) followed by MoCo's projection head."""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from .config import ModelConfig


def build_backbone(arch: str, small_stem: bool = False) -> tuple[nn.Module, int]:
    """A torchvision ResNet with `fc` replaced by Identity, and its feature width.

    Keeping torchvision's module names means the backbone's state dict is a torchvision state dict minus `fc`.
    """
    net = getattr(torchvision.models, arch)(weights=None)
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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone, self.width = build_backbone(cfg.arch, cfg.small_stem)
        self.head = build_head(cfg, self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
