"""Learning rate: linear scaling with the global batch, linear warm-up, then cosine (or constant), per step."""
from __future__ import annotations

import math

from .config import OptimConfig


def base_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / cfg.lr_batch


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str = "cosine") -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
