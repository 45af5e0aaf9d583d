"""The pure-torch InfoNCE loss against a set of negatives, and the negative-score statistics: the spec that
every fast kernel (infonce_triton.py) is checked against.

    logits = [q_hat . k_hat, q_hat @ negatives^T] / T            target index 0, cross-entropy

`negatives` is whatever the loss contrasts against: MoCo's queue, or its negative interpolation. How that
interpolation is drawn and defined is Feature Transformation's business (fastft/feature_transform.py); a
kernel that forms it in registers implements that definition, it does not own it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def moco_logits(q_hat: torch.Tensor, k_hat: torch.Tensor, negatives: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """[N, 1 + K] logits: column 0 is the positive, the rest the negatives, in q_hat's dtype."""
    neg = negatives.to(q_hat.dtype)
    l_pos = (q_hat * k_hat).sum(dim=1, keepdim=True)
    l_neg = q_hat @ neg.t()
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def info_nce_loss(q_hat: torch.Tensor, k_hat: torch.Tensor, negatives: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy with target 0, and the logits it was computed from."""
    logits = moco_logits(q_hat, k_hat, negatives, temperature)
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


Bins = tuple[float, float, int]  # (lo, hi, nbins)


def histogram_bins(scores: torch.Tensor, lo: float, hi: float, nbins: int) -> torch.Tensor:
    """Bin index of each score: floor((s - lo) / (hi - lo) * nbins), clamped into [0, nbins - 1]."""
    idx = torch.floor((scores.float() - lo) * (nbins / (hi - lo)))
    return idx.clamp_(0, nbins - 1).long()


def histogram(scores: torch.Tensor, bins: Bins) -> torch.Tensor:
    """[nbins] int64 counts of `scores` ([rows, cols] or [n]) under histogram_bins' rule.

    Counted with a per-row scatter_add, not torch.bincount: on CUDA bincount reads min/max back to the host (a
    sync every step), and one global histogram makes every thread hit the same few hot bins.
    """
    lo, hi, nbins = bins
    idx = histogram_bins(scores, lo, hi, nbins)
    idx = idx.reshape(1, -1) if idx.dim() == 1 else idx.reshape(idx.shape[0], -1)
    per_row = torch.zeros(idx.shape[0], nbins, dtype=torch.int32, device=idx.device)
    per_row.scatter_add_(1, idx, torch.ones((), dtype=torch.int32, device=idx.device).expand_as(idx))
    return per_row.sum(0, dtype=torch.int64)


def neg_score_stats(neg_scores: torch.Tensor, temperature: float, bins: Bins) -> NegStats:
    """The statistics of an [N, K] matrix of negative scores (e.g. logits[:, 1:] * T)."""
    s = neg_scores.float()
    return NegStats(s.sum(1), (s * s).sum(1), (s / temperature).exp().sum(1), histogram(s, bins))
