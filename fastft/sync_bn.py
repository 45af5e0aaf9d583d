"""Synchronised batch norm on any device.

torch.nn.SyncBatchNorm only runs on GPUs; this twin runs the same computation over gloo on the CPU, so the
multi-process code path (and its equivalence with one big batch) is testable without a GPU. On CUDA the
torch module is used.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn


_GROUP = None


def _stats_group():
    """A process group of its own for the statistics, created once (a collective call, made the same way on
    every rank since all ranks run the same first forward)."""
    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(backend=dist.get_backend())
    return _GROUP


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over [N, C] or [N, C, ...] whose training statistics are those of the global batch (all ranks)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        dims = (0, *range(2, x.dim()))
        count = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        # One differentiable all-reduce of [sum, sum of squares, count]: gradients flow back to every rank's input.
        packed = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        packed = dist_fn.all_reduce(packed, group=_stats_group())
        n = packed[-1]
        mean = packed[:c] / n
        var = packed[c:2 * c] / n - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)  # unbiased, as torch
        shape = (1, c) + (1,) * (x.dim() - 2)  # per-channel values broadcast over the other dims
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            y = (xf - mean.view(shape)) * (scale * self.weight).view(shape) + self.bias.view(shape)
        else:
            y = (xf - mean.view(shape)) * scale.view(shape)
        return y.to(x.dtype)


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm1d/2d of `module` synchronised across ranks: torch's on CUDA, the twin above elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    return module
