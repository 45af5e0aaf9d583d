"""Which logits/loss implementation a run uses (`loss.kernel`)."""
from __future__ import annotations

from typing import Callable

import torch

from fastft.kernels import info_nce_loss


def select_loss(kernel: str, device: torch.device) -> Callable:
    """auto: the fastest implementation available on `device`; torch: the pure-torch reference."""
    if kernel in ("auto", "torch"):
        return info_nce_loss
    raise ValueError(f"loss.kernel = {kernel!r}: valid choices are 'auto', 'torch'")
