"""MoCo v1/v2 with Feature Transformation: the whole method in one class (after facebookresearch/moco builder.py)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastft.kernels import NegStats, info_nce_loss

from .config import FTConfig, ModelConfig
from .distributed import all_gather_cat, batch_shuffle, batch_unshuffle
from .encoder import Encoder
from .feature_transform import FeatureTransform, FTDraw

if TYPE_CHECKING:
    from .score_stats import ScoreRecorder

# (loss, logits) for the torch reference; a fused loss (fastft/loss.py, `fused = True`) returns NegStats or None.
LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor | NegStats | None]]


class MoCo(nn.Module):
    def __init__(self, cfg: ModelConfig, ft: FTConfig, loss_fn: LossFn = info_nce_loss,
                 queue_dtype: torch.dtype = torch.float32, ft_seed: int = 0, ft_stream: int = 0):
        super().__init__()
        self.cfg = cfg
        self.momentum = cfg.momentum
        self.temperature = cfg.temperature
        self.ft = FeatureTransform(ft, ft_seed, ft_stream)  # stream: the rank, or 0 on all ranks when shared
        self.shuffle_bn = cfg.key_bn == "shuffle"  # "sync": both encoders hold SyncBN (set up by the trainer)
        self.loss_fn = loss_fn

        self.encoder_q = Encoder(cfg)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False

        # [K, C] so that each negative is one contiguous row (what the kernels stream), stored in `queue_dtype`
        # (loss.queue_dtype: 16-bit halves the bytes the loss reads).
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.dim), dim=1).to(queue_dtype))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def use_ddp(self, ddp_query: nn.Module) -> None:
        """Run the query encoder through its DDP wrapper. The wrapper is kept out of the module tree, so the
        state dict has the same keys with 1 or N processes (DDP wraps the query encoder only: it alone has
        gradients, and wrapping the whole module broke SyncBN gradients on gloo)."""
        self.__dict__["_ddp_query"] = ddp_query

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.__dict__.get("_ddp_query", self.encoder_q)(x)

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

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, epoch: int = 0, scores: ScoreRecorder | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | NegStats | None, FTDraw]:
        """Loss and logits (after FT) for one step; updates the key encoder and the queue as MoCo does.

        The logits are [N, 1 + K] for the torch loss; a fused loss never builds them and returns in their place
        the NegStats of this step's negative scores when `scores` is given (binned as scores.neg_bins), else None.

        `scores`: records this step's pos/neg score statistics on the device (fastft/score_stats.py).
        """
        q = F.normalize(self.query(im_q), dim=1)
        with torch.no_grad():
            self.momentum_update()
            if self.shuffle_bn:  # the keys' BN statistics must not come from their own queries' batch
                im_k, undo = batch_shuffle(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            if self.shuffle_bn:
                k = batch_unshuffle(k, undo)

        # The contrastive part runs in fp32 whatever the encoders' autocast dtype: it is O(N x K), not the cost.
        with torch.autocast(q.device.type, enabled=False):
            q, k = q.float(), k.float().detach()
            draw = self.ft.draw(q.shape[0], self.queue, epoch)
            q_hat, k_hat = self.ft.positives(q, k, draw)
            # Without interpolation the logits read the queue itself, which enqueue() overwrites before
            # backward needs it: read a copy (as MoCo does). With interpolation the mix is already a copy, and a
            # fused loss does not read the queue after forward at all.
            fused = getattr(self.loss_fn, "fused", False)
            queue = self.queue if draw.perm is not None or fused else self.queue.clone()
            extra = {}
            if fused and scores is not None:  # the kernel bins the negative scores in the same pass
                extra["stats_bins"] = (scores.neg_bins.lo, scores.neg_bins.hi, scores.neg_bins.n)
            loss, logits = self.loss_fn(q_hat, k_hat, queue, self.temperature, draw.lam_n, draw.perm, **extra)
            if scores is not None:  # reads the stored queue before enqueue() below overwrites it
                scores.observe(logits, q_hat, k_hat, q=q, k=k, queue=self.queue, draw=draw)

        self.enqueue(all_gather_cat(k))  # clean keys, never the transformed ones
        return loss, logits, draw
