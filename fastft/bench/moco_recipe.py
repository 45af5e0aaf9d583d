"""The outside baseline of `fastft-bench loader`: MoCo v2's data loading as its reference code runs it.

A plain `torchvision.datasets.ImageFolder` with the transforms of facebookresearch/moco's main_moco.py
(`--aug-plus`, including its PIL `GaussianBlur` with radius = sigma) in a plain DataLoader, written the way users
write it: nothing of fastft in its path. Every backend's speed is quoted against this, the recipe a MoCo user
actually runs, never against a slowed copy of it.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import torch
from PIL import ImageFilter
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

NAME = "moco-recipe"


class GaussianBlur:
    """MoCo's blur (moco/loader.py): PIL's GaussianBlur, radius ~ U(sigma)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x):
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCropsTransform:
    def __init__(self, base):
        self.base = base

    def __call__(self, x):
        return [self.base(x), self.base(x)]


def moco_v2_transform(size: int = 224) -> transforms.Compose:
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])


class MocoRecipeLoader:
    """(view1, view2, labels) on `device`, as main_moco.py's loop receives them (pinned, non_blocking copies)."""

    def __init__(self, folder: str | Path, batch_size: int, workers: int, image_size: int, device: torch.device):
        self.device = device
        self.dataset = datasets.ImageFolder(str(folder), TwoCropsTransform(moco_v2_transform(image_size)))
        self.loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                 pin_memory=device.type == "cuda", drop_last=True)

    def set_epoch(self, epoch: int) -> None:
        """main_moco.py shuffles through its sampler's epoch; here the DataLoader reshuffles on each iter."""

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for (v1, v2), labels in self.loader:
            yield (v1.to(self.device, non_blocking=True), v2.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))
