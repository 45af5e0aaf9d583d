"""MoCo v1/v2 with Feature Transformation: the whole method in one class (after facebookresearch/moco builder.py).

One step, as the trainer runs it (fastft/trainer.py):

    out = model(im_q, im_k, epoch)        # encoders, momentum update, FT, loss          -> MoCoStep
    out.loss.backward(); optimizer.step()
    model.enqueue(out.k)                   # the clean keys of every rank, after backward

Enqueueing is its own call, after backward, because the torch loss reads the queue during backward (fastft/loss.py)
and because the score recorder reads the queue this step's loss saw.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastft.kernels import NegStats

from .config import FTConfig, ModelConfig
from .distributed import all_gather_cat, batch_shuffle, batch_unshuffle, shuffle_a2a, unshuffle_a2a, world_size
from .encoder import Encoder
from .feature_transform import FeatureTransform, FTDraw
from .loss import Bins, TorchInfoNCE
from .split_bn import permute_batch, split_norm_layer, unpermute_batch


def key_bn_mode(cfg: ModelConfig, world: int) -> str:
    """What `model.key_bn` means at this world size: auto is split on one process and shuffle under DDP."""
    if cfg.key_bn == "auto":
        return "split" if world == 1 else "shuffle"
    return cfg.key_bn


@dataclass
class MoCoStep:
    """What one forward pass produced: the loss and everything the score recorder and the queue need."""
    loss: torch.Tensor
    pos: torch.Tensor  # [N] positive scores q_hat . k_hat the loss used (after FT), detached
    neg: NegStats | None  # their negative-score statistics, when stats_bins was given
    q: torch.Tensor  # [N, C] clean, L2-normalised fp32 queries, detached
    k: torch.Tensor  # [N, C] clean, L2-normalised fp32 keys of this rank (what enqueue takes)
    draw: FTDraw


class MoCo(nn.Module):
    def __init__(self, cfg: ModelConfig, ft: FTConfig, loss: nn.Module | None = None,
                 queue_dtype: torch.dtype = torch.float32, ft_seed: int = 0, ft_stream: int = 0):
        super().__init__()
        self.cfg = cfg
        self.momentum = cfg.momentum
        self.temperature = cfg.temperature
        self.ft = FeatureTransform(ft, ft_seed, ft_stream)  # stream: the rank, or 0 on all ranks when shared
        self.key_bn = key_bn_mode(cfg, world_size())  # "sync": both encoders hold SyncBN (set up by the trainer)
        self.loss = loss if loss is not None else TorchInfoNCE()

        self.encoder_q = Encoder(cfg, split_norm_layer(cfg.bn_splits) if self.key_bn == "split" else None)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        # A bound method, not a module attribute: a DDP wrapper set by use_ddp stays out of the module tree,
        # so the state dict has the same keys with 1 or N processes.
        self.encode_query: Callable[[torch.Tensor], torch.Tensor] = self.encoder_q.__call__

        # [K, C] so that each negative is one contiguous row (what the kernels stream), stored in `queue_dtype`
        # (loss.queue_dtype: 16-bit halves the bytes the loss reads).
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.dim), dim=1).to(queue_dtype))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def use_ddp(self, ddp_query: nn.Module) -> None:
        """Run the query encoder through its DDP wrapper (DDP wraps the query encoder only: it alone has
        gradients, and wrapping the whole module broke SyncBN gradients on gloo)."""
        self.encode_query = ddp_query.__call__

    @torch.no_grad()
    def momentum_update(self) -> None:
        qs = [p.detach() for p in self.encoder_q.parameters()]
        ks = list(self.encoder_k.parameters())
        torch._foreach_mul_(ks, self.momentum)
        torch._foreach_add_(ks, qs, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def encode_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        # Shuffle-BN: the keys' BN statistics must not come from their own queries' batch. Both ways encode the
        # same rows on the same rank (fastft/distributed.py); all-to-all moves W times fewer images.
        if self.key_bn in ("shuffle", "split"):
            im_k, plan = shuffle_a2a(im_k)  # nothing on one process
            # split BN: also permute within the batch, so the key groups hold other images than the query groups
            # (with one group the order would change nothing but the rounding).
            perm = None
            if self.key_bn == "split" and self.cfg.bn_splits > 1:
                im_k, perm = permute_batch(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            return unshuffle_a2a(k if perm is None else unpermute_batch(k, perm), plan)
        if self.key_bn == "shuffle_gather":
            im_k, undo = batch_shuffle(im_k)
            return batch_unshuffle(F.normalize(self.encoder_k(im_k), dim=1), undo)
        return F.normalize(self.encoder_k(im_k), dim=1)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write every rank's `keys` (clean, never transformed) at the pointer, wrapping around K."""
        keys = all_gather_cat(keys)
        n, k = keys.shape[0], self.queue.shape[0]
        if n >= k:  # more keys than slots: the newest K win, as if written one after another
            keys = keys[n - k:]
            idx = (self.queue_ptr + n - k + torch.arange(k, device=keys.device)) % k
        else:
            idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % k
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % k)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, epoch: int = 0,
                stats_bins: Bins | None = None) -> MoCoStep:
        """The loss of one step after Feature Transformation; updates the key encoder (not the queue: enqueue).

        `stats_bins` (lo, hi, nbins): also return the negative-score statistics, binned so (score logging).
        """
        q = F.normalize(self.encode_query(im_q), dim=1)
        self.momentum_update()
        k = self.encode_keys(im_k)

        # The contrastive part runs in fp32 whatever the encoders' autocast dtype: it is O(N x K), not the cost.
        with torch.autocast(q.device.type, enabled=False):
            q, k = q.float(), k.float().detach()
            draw = self.ft.draw(q.shape[0], self.queue, epoch)
            q_hat, k_hat = self.ft.positives(q, k, draw)
            out = self.loss(q_hat, k_hat, self.queue, self.temperature, draw.mix, stats_bins)
        return MoCoStep(out.loss, out.pos, out.neg, q.detach(), k, draw)
