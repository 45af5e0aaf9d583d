"""The pure-torch MoCo logits and InfoNCE loss with negative interpolation: the spec for the Triton kernel.

    neg    = lam_n * queue + (1 - lam_n) * queue[perm]     (only when interpolating; the queue itself is untouched)
    logits = [q_hat . k_hat, q_hat @ neg^T] / T            target index 0, cross-entropy

`lam_n` is a float (one scalar per step, the authors' default) or a [K, C] tensor (per-element mask).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def mix_negatives(queue: torch.Tensor, lam_n: float | torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Negative interpolation: a fresh [K, C] tensor; `queue` is read, never written."""
    return lam_n * queue + (1 - lam_n) * queue[perm]


def moco_logits(q_hat: torch.Tensor, k_hat: torch.Tensor, queue: torch.Tensor, temperature: float,
                lam_n: float | torch.Tensor | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
    """[N, 1 + K] logits: column 0 is the positive, the rest the negatives. Computed in the queue's dtype."""
    neg = queue if perm is None else mix_negatives(queue, lam_n, perm)
    neg = neg.to(q_hat.dtype)
    l_pos = (q_hat * k_hat).sum(dim=1, keepdim=True)
    l_neg = q_hat @ neg.t()
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def info_nce_loss(q_hat: torch.Tensor, k_hat: torch.Tensor, queue: torch.Tensor, temperature: float,
                  lam_n: float | torch.Tensor | None = None,
                  perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy with target 0, and the logits it was computed from."""
    logits = moco_logits(q_hat, k_hat, queue, temperature, lam_n, perm)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target), logits


class NegStats(NamedTuple):
    """Per-row statistics of the negative scores s_ij = q_hat_i . n_j (cosine-like, NOT divided by T).

    sum, sumsq, sumexp: [N] fp32, sum_j s_ij, sum_j s_ij^2, sum_j exp(s_ij / T).
    hist: [nbins] int64 counts of all s_ij in `nbins` equal bins of [lo, hi); values outside land in the end bins.
    """
    sum: torch.Tensor
    sumsq: torch.Tensor
    sumexp: torch.Tensor
    hist: torch.Tensor


def histogram_bins(scores: torch.Tensor, lo: float, hi: float, nbins: int) -> torch.Tensor:
    """Bin index of each score: floor((s - lo) / (hi - lo) * nbins), clamped into [0, nbins - 1]."""
    idx = torch.floor((scores.float() - lo) * (nbins / (hi - lo)))
    return idx.clamp_(0, nbins - 1).long()


def neg_score_stats(neg_scores: torch.Tensor, temperature: float, bins: tuple[float, float, int]) -> NegStats:
    """The statistics of an [N, K] matrix of negative scores (e.g. logits[:, 1:] * T)."""
    s = neg_scores.float()
    lo, hi, nbins = bins
    hist = torch.bincount(histogram_bins(s, lo, hi, nbins).flatten(), minlength=nbins)
    return NegStats(s.sum(1), (s * s).sum(1), (s / temperature).exp().sum(1), hist)
