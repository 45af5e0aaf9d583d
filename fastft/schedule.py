"""Learning rate: linear scaling with the global batch, linear warm-up, then a cosine (or constant).

    cosine        per step, from the peak to lr_floor x peak over the steps after warm-up (fastft's default)
    cosine_epoch  the authors' (learning/base_trainer.py, adjust_learning_rate): set once per epoch, epochs counted
                  from 1, lr_e = floor + (peak - floor) (1 + cos(pi e / E)) / 2, floor = lr_floor x peak (0.001)
    constant      the peak throughout
"""
from __future__ import annotations

import math

from .config import OptimConfig


def base_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / cfg.lr_batch


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, schedule: str = "cosine",
          floor: float = 0.0, steps_per_epoch: int = 1) -> float:
    """The lr of optimizer step `step` (counted from 0) of `total_steps`; `floor` as a fraction of `peak`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    if schedule == "cosine_epoch":
        progress = (step // steps_per_epoch + 1) / max(1, total_steps // steps_per_epoch)
    else:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    low = floor * peak
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
