"""MoCo v1/v2 with Feature Transformation: the whole method in one class (after facebookresearch/moco builder.py)."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastft.kernels import info_nce_loss

from .config import FTConfig, ModelConfig
from .distributed import all_gather_cat
from .encoder import Encoder
from .feature_transform import FeatureTransform, FTDraw

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class MoCo(nn.Module):
    def __init__(self, cfg: ModelConfig, ft: FTConfig, loss_fn: LossFn = info_nce_loss):
        super().__init__()
        self.cfg = cfg
        self.momentum = cfg.momentum
        self.temperature = cfg.temperature
        self.ft = FeatureTransform(ft)
        self.loss_fn = loss_fn

        self.encoder_q = Encoder(cfg)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False

        # [K, C] so that each negative is one contiguous row (what the kernels stream).
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        qs = [p.detach() for p in self.encoder_q.parameters()]
        ks = list(self.encoder_k.parameters())
        torch._foreach_mul_(ks, self.momentum)
        torch._foreach_add_(ks, qs, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` (already gathered from all ranks) at the pointer, wrapping around K."""
        n, k = keys.shape[0], self.queue.shape[0]
        if n >= k:  # more keys than slots: the newest K win, as if written one after another
            keys = keys[n - k:]
            idx = (self.queue_ptr + n - k + torch.arange(k, device=keys.device)) % k
        else:
            idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % k
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % k)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, epoch: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, FTDraw]:
        """Loss and logits (after FT) for one step; updates the key encoder and the queue as MoCo does."""
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self.momentum_update()
            k = F.normalize(self.encoder_k(im_k), dim=1)

        # The contrastive part runs in fp32 whatever the encoders' autocast dtype: it is O(N x K), not the cost.
        with torch.autocast(q.device.type, enabled=False):
            q, k = q.float(), k.float().detach()
            draw = self.ft.draw(q.shape[0], self.queue, epoch)
            q_hat, k_hat = self.ft.positives(q, k, draw)
            # Without interpolation the logits read the queue itself, which enqueue() overwrites before
            # backward needs it: read a copy (as MoCo does). With interpolation the mix is already a copy.
            queue = self.queue if draw.perm is not None else self.queue.clone()
            loss, logits = self.loss_fn(q_hat, k_hat, queue, self.temperature, draw.lam_n, draw.perm)

        self.enqueue(all_gather_cat(k))  # clean keys, never the transformed ones
        return loss, logits, draw
