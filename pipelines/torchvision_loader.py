"""The reference loader: torchvision ImageFolder + the augmentation spec, DataLoader workers.

Yields (view1, view2, labels) on the training device, channels-last, float32, ImageNet-normalised. Every
faster backend must yield exactly the same: that is the loader interface.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler

from .bad_images import BadImagePolicy, BadImages, Replacing, collate


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt)


class TorchvisionLoader:
    """Epoch-seeded: the order and the augmentation of epoch e depend only on (seed, e), which makes resume exact."""

    def __init__(self, dataset, batch_size: int, workers: int, device: torch.device, *, train: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = True,
                 bad_images: BadImagePolicy = BadImagePolicy()):
        self.dataset = dataset
        self.device = device
        self.channels_last = channels_last
        self.seed = seed
        self.workers = workers
        self.batch_size = batch_size
        self.train = train
        # Sharded and shuffled per rank when training; eval sees everything in order (no padding duplicates).
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train, seed=seed,
                                          drop_last=False) if train else None
        self.epoch = 0
        # Unreadable files are passed over in the workers (Replacing) and judged here, in the main process.
        self.bad = BadImages(bad_images, len(self.sampler) if self.sampler is not None else len(dataset),
                             str(getattr(dataset, "root", "the dataset")))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _loader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)  # worker seeds of this epoch
        return DataLoader(Replacing(self.dataset), batch_size=self.batch_size, sampler=self.sampler, shuffle=False,
                          num_workers=self.workers, pin_memory=self.device.type == "cuda", drop_last=self.train,
                          generator=gen, persistent_workers=False, collate_fn=collate,
                          prefetch_factor=4 if self.workers > 0 else None)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def batches(self) -> Iterator:
        """The DataLoader's batches, each unreadable file met on the way judged by the bad-image policy."""
        for batch, bad in self._loader():
            for path, reason in bad:
                self.bad.report(path, reason)
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches():
            if self.train:
                (v1, v2), labels = batch
                yield (to_device(v1, self.device, self.channels_last), to_device(v2, self.device, self.channels_last),
                       labels.to(self.device, non_blocking=True))
            else:
                images, labels = batch
                yield to_device(images, self.device, self.channels_last), labels.to(self.device, non_blocking=True)

