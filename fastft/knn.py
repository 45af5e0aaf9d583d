"""Weighted kNN evaluation (Wu et al. 2018; the monitor MoCo users watch): cosine similarity, top-k
neighbours voting with weight exp(sim / T).

Also on its own: `python -m fastft.knn CONFIG [--pretrained CKPT | --random-init | --pixels] [key=value ...]`
(without --pretrained: the newest checkpoint in run.out_dir).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastft.pipelines.loader import eval_loader

from . import checkpoint as ckpt_io
from .config import Config, ConfigError, load_config
from .device import pick_device, pick_precision
from .pretrained import pick_backbone


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


def knn_features(encode: Callable[[torch.Tensor], torch.Tensor], cfg: Config, device: torch.device,
                 dtype: torch.dtype) -> KnnResult:
    """Weighted kNN top-1 of `encode` on the val split, the train split (eval transform) as the memory bank."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        train_loader = eval_loader(cfg, cfg.data.train_split, device)
        tf, tl = extract_features(encode, train_loader)
        vf, vl = extract_features(encode, eval_loader(cfg, cfg.data.val_split, device))
    num_classes = len(train_loader.dataset.classes)
    return KnnResult(knn_top1(tf, tl, vf, vl, num_classes, cfg.knn.k, cfg.knn.temperature), len(tl), len(vl))


def evaluate_knn(model: nn.Module, cfg: Config, device: torch.device, dtype: torch.dtype,
                 pixels: bool = False) -> KnnResult:
    """Weighted kNN top-1 of a MoCo model's query backbone (or of raw pixels); the model's mode is kept."""
    was_training = model.training
    model.eval()
    try:
        return knn_features((lambda x: x) if pixels else model.encoder_q.backbone, cfg, device, dtype)
    finally:
        model.train(was_training)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fastft.knn", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config file (the one the encoder was pretrained with)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. knn.k=20")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--pretrained", metavar="CKPT", help="pretraining checkpoint (default: newest in run.out_dir)")
    which.add_argument("--random-init", action="store_true", help="the same architecture at random initialisation")
    which.add_argument("--pixels", action="store_true", help="raw pixels (eval transform), no encoder")
    return ap.parse_intermixed_args(argv)  # options may come before, between or after the overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        device = pick_device(cfg.run.device)
        dtype = pick_precision(cfg.run.precision, device)
        if args.pixels:
            encode, what = (lambda x: x), "raw pixels"
        else:
            backbone = pick_backbone(cfg, args.pretrained, args.random_init)
            encode = backbone.module.to(device).eval()
            if cfg.run.channels_last:
                encode = encode.to(memory_format=torch.channels_last)
            what = backbone.info.describe()
        res = knn_features(encode, cfg, device, dtype)
    except (ConfigError, ckpt_io.CheckpointError, FileNotFoundError) as e:
        print(f"fastft.knn: error: {e}", file=sys.stderr)
        return 2
    print(f"kNN top-1 on {cfg.data.val_split} (k {cfg.knn.k}, T {cfg.knn.temperature}; {res.n_train} train / "
          f"{res.n_val} val images): {res.top1:.4f}  [{what}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
