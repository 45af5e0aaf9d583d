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
        # One fused batch norm per group, each on a contiguous slice (a view in either memory format). It returns
        # the group's mean and 1/std, from which the running statistics move: no second pass over the data.
        outs, means, invstds = [], [], []
        for chunk in x.chunk(self.splits):
            out, mean, invstd = torch.native_batch_norm(chunk, self.weight, self.bias, None, None, True, 0.0,
                                                        self.eps)
            outs.append(out)
            means.append(mean)
            invstds.append(invstd)
        if self.track_running_stats and self.running_mean is not None:
            count = x.numel() // (self.splits * x.shape[1])  # values per channel in one group
            self._update_running_stats(torch.stack(means), torch.stack(invstds), count)
        return torch.cat(outs)

    @torch.no_grad()
    def _update_running_stats(self, means: torch.Tensor, invstds: torch.Tensor, count: int) -> None:
        """Each group moves its own copy of the running statistics as BatchNorm2d would (unbiased variance); the
        module keeps their mean."""
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        var = (invstds.float().pow(-2) - self.eps) * (count / max(count - 1, 1))
        self.running_mean.lerp_(means.float().mean(0).to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(var.mean(0).to(self.running_var.dtype), momentum)


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
