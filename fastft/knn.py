"""Weighted kNN evaluation (Wu et al. 2018; the monitor MoCo users watch): cosine similarity, top-k
neighbours voting with weight exp(sim / T)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(encode: Callable[[torch.Tensor], torch.Tensor],
                     batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised fp32 features and labels for every batch."""
    feats, labels = [], []
    for images, y in batches:
        feats.append(F.normalize(encode(images).float().flatten(1), dim=1))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores [M, num_classes] for each query; chunked so the M x N similarity never exists whole."""
    k = min(k, train_feats.shape[0])
    out = []
    for start in range(0, query_feats.shape[0], chunk):
        sim = query_feats[start:start + chunk] @ train_feats.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def knn_top1(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
             val_labels: torch.Tensor, num_classes: int, k: int = 200, temperature: float = 0.07) -> float:
    scores = knn_predict(train_feats, train_labels, val_feats, num_classes, k, temperature)
    return (scores.argmax(dim=1) == val_labels).float().mean().item()
