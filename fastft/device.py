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


def set_threads(n: int) -> None:
    """run.threads: torch's CPU threads in this process (0 = leave torch's default)."""
    if n > 0:
        torch.set_num_threads(n)


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of `run.precision` (float32 = no autocast). On CUDA it also sets how fp32 math runs:
    `fp32` is IEEE fp32 in every convolution and matmul, as the authors' README command trains (no --amp), so
    cuDNN's TF32 default is switched off; `tf32` is fp32 storage on TF32 tensor cores (torch's cuDNN default, matmuls
    too). Other values leave torch's defaults."""
    if device.type == "cuda" and name in ("fp32", "tf32"):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    if name == "auto":
        # bf16 is ~10x slower than fp32 on CPUs without bf16 instructions (measured, docs/design.md section 4).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def loss_tf32(precision: str, tf32: bool) -> bool:
    """Whether the fused loss may multiply fp32 on TF32 tensor cores: never under `run.precision: fp32`."""
    return tf32 and precision != "fp32"
