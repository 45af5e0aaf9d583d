"""Which device and compute dtype a run uses; shared by the training and evaluation entry points."""
from __future__ import annotations

import torch

from .config import ConfigError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is ~10x slower than fp32 on CPUs without bf16 instructions (measured, docs/design.md section 4).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
