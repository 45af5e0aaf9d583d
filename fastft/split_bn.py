"""Split batch norm: MoCo's defence against the BatchNorm shortcut on one device (`model.key_bn: split`).

A query batch and its key batch hold the same images. If each encoder normalises with its whole batch's
statistics, the statistics themselves carry a signature of the batch that a query and its key share, and the
network can lower the loss through it instead of through the images (MoCo, section 3.3). Shuffle-BN breaks that
by encoding the keys on other GPUs; on one device FAIR's single-GPU MoCo demo and lightly split the batch into
`splits` groups with statistics of their own, and permute the keys before the key encoder (fastft/moco.py), so
the groups of keys and of queries hold different images.

In training, group g (rows [g n / splits, (g + 1) n / splits) of the batch) is normalised with its own mean and
variance; the running statistics move by the mean of the groups' updates. In eval mode it is an ordinary
BatchNorm2d, and its state dict is BatchNorm2d's: checkpoints export as plain torchvision ResNets.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, splits={self.splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits == 1:
            return super().forward(x)
        n = x.shape[0]
        if n % self.splits:
            raise ValueError(f"SplitBatchNorm: a batch of {n} does not split into {self.splits} equal groups "
                             f"(model.bn_splits must divide the batch)")
        track = self.track_running_stats and self.running_mean is not None
        if track:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        outs, means, vars_ = [], [], []
        # One fused batch_norm per group, each on a contiguous slice (a view in either memory format); each
        # group updates its own copy of the running statistics, whose mean is the module's new running value.
        for chunk in x.chunk(self.splits):
            rm = self.running_mean.clone() if track else None
            rv = self.running_var.clone() if track else None
            outs.append(F.batch_norm(chunk, rm, rv, self.weight, self.bias, True, momentum, self.eps))
            if track:
                means.append(rm)
                vars_.append(rv)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(torch.stack(means).mean(0))
                self.running_var.copy_(torch.stack(vars_).mean(0))
        return torch.cat(outs)


def split_norm_layer(splits: int):
    """The `norm_layer` torchvision's ResNet builders take: SplitBatchNorm with `splits` groups."""
    return functools.partial(SplitBatchNorm, splits=splits)


@torch.no_grad()
def permute_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x in a random order of its rows, and the permutation (undo it with `unpermute_batch`)."""
    perm = torch.randperm(x.shape[0], device=x.device)
    return x[perm], perm


@torch.no_grad()
def unpermute_batch(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The rows of y back in the order before `permute_batch`: out[perm[j]] = y[j]."""
    out = torch.empty_like(y)
    out[perm] = y
    return out
