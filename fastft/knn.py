"""Weighted kNN evaluation (Wu et al. 2018; the monitor MoCo users watch): cosine similarity, top-k
neighbours voting with weight exp(sim / T). The trainer runs it every knn.every epochs; `fastft-knn`
(fastft/knn_cli.py) runs it on its own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config
from .data import eval_loader


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


@dataclass
class KnnResult:
    top1: float
    n_train: int
    n_val: int
    bad_images: int = 0  # unreadable images replaced by others (data.on_bad_image = skip)


def knn_features(encode: Callable[[torch.Tensor], torch.Tensor], cfg: Config, device: torch.device,
                 dtype: torch.dtype) -> KnnResult:
    """Weighted kNN top-1 of `encode` on the val split, the train split (eval transform) as the memory bank."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        train_loader = eval_loader(cfg, cfg.data.train_split, device)
        tf, tl = extract_features(encode, train_loader)
        val_loader = eval_loader(cfg, cfg.data.val_split, device)
        vf, vl = extract_features(encode, val_loader)
    num_classes = len(train_loader.dataset.classes)
    bad = sum(loader.bad.take()[0] for loader in (train_loader, val_loader) if hasattr(loader, "bad"))
    return KnnResult(knn_top1(tf, tl, vf, vl, num_classes, cfg.knn.k, cfg.knn.temperature), len(tl), len(vl), bad)


def evaluate_knn(model: nn.Module, cfg: Config, device: torch.device, dtype: torch.dtype,
                 pixels: bool = False) -> KnnResult:
    """Weighted kNN top-1 of a MoCo model's query backbone (or of the eval-transformed pixels); the model's mode
    is kept."""
    was_training = model.training
    model.eval()
    try:
        return knn_features((lambda x: x) if pixels else model.encoder_q.backbone, cfg, device, dtype)
    finally:
        model.train(was_training)


# knn.pixels / fastft-knn --pixels: kNN on the images themselves, as the eval transform gives them (resized,
# centre-cropped, ImageNet-normalised): the floor that shows what an encoder adds.
PIXELS = "pixels (eval transform)"


def knn_report(summary: dict, cfg: Config) -> str:
    """The kNN line of a run's summary: trained vs random init vs pixels, where measured."""
    names = {"knn_top1": "trained", "knn_init_top1": "random init", "knn_pixels_top1": PIXELS}
    parts = [f"{name} {summary[key]:.4f}" for key, name in names.items() if summary.get(key) is not None]
    return f"kNN top-1 on {cfg.data.val_split} (k {cfg.knn.k}, T {cfg.knn.temperature}): " + " | ".join(parts)
