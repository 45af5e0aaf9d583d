"""Which logits/loss implementation a run uses (`loss.kernel`) and how the queue is stored (`loss.queue_dtype`).

    torch   kernels.reference.info_nce_loss: materialises the [N, 1 + K] logits; returns (loss, logits).
    triton  kernels.infonce_triton (fused, no N x K logits): returns (loss, NegStats or None). Needs CUDA, or
            the Triton interpreter on the CPU (TRITON_INTERPRET=1 set before Python starts; slow, for tests).
    auto    triton on CUDA, torch elsewhere (and torch when triton cannot be imported).

A fused loss function has `fused = True`. For MoCo that means: it takes `stats_bins=(lo, hi, nbins)` and then
returns the negative-score NegStats in place of the logits (None without it), and it does not read the queue
after the forward pass (its gradient is accumulated during forward), so the queue needs no copy before enqueue.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from fastft.kernels import NegStats, info_nce_loss

from .config import ConfigError

LossFn = Callable[..., tuple[torch.Tensor, "torch.Tensor | NegStats | None"]]

QUEUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def queue_dtype(name: str) -> torch.dtype:
    """`loss.queue_dtype` as a torch dtype (the storage of MoCo's queue; bf16/fp16 halve the bytes read)."""
    if name not in QUEUE_DTYPES:
        raise ConfigError(f"loss.queue_dtype = {name!r}: valid choices are {', '.join(map(repr, QUEUE_DTYPES))}")
    return QUEUE_DTYPES[name]


class FusedInfoNCE:
    """MoCo's loss_fn on the Triton kernel: reference.info_nce_loss's call, (loss, NegStats | None) back."""

    fused = True

    def __call__(self, q_hat: torch.Tensor, k_hat: torch.Tensor, queue: torch.Tensor, temperature: float,
                 lam_n: float | torch.Tensor | None = None, perm: torch.Tensor | None = None, *,
                 stats_bins: tuple[float, float, int] | None = None) -> tuple[torch.Tensor, NegStats | None]:
        from fastft.kernels.infonce_triton import info_nce_loss_triton

        return info_nce_loss_triton(q_hat, k_hat, queue, temperature, lam_n, perm, stats_bins=stats_bins)

    def __repr__(self) -> str:
        return "FusedInfoNCE()"


def _triton_module():
    """The kernel module, or the reason it cannot be used (triton missing or broken)."""
    try:
        from fastft.kernels import infonce_triton
    except Exception as e:  # ImportError, or a triton that fails on import: report, never crash `auto`
        return None, f"{type(e).__name__}: {e}"
    return infonce_triton, ""


def select_loss(kernel: str, device: torch.device) -> LossFn:
    """auto: the fastest implementation available on `device`; torch: the pure-torch reference; triton: fused."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"loss.kernel = {kernel!r}: valid choices are 'auto', 'torch', 'triton'")
    if kernel == "torch" or (kernel == "auto" and device.type != "cuda"):
        return info_nce_loss
    mod, why = _triton_module()
    if kernel == "auto":
        if mod is None or mod.INTERPRETED:  # interpreted kernels on a GPU would be far slower than torch
            why = "runs in interpreter mode (TRITON_INTERPRET=1)" if mod else f"failed to import: {why}"
            warnings.warn(f"loss.kernel = 'auto' on CUDA uses the torch reference: Triton {why}")
            return info_nce_loss
        return FusedInfoNCE()
    if mod is None:
        raise ConfigError(f"loss.kernel = 'triton' but the Triton kernels cannot be imported ({why}); "
                          "use loss.kernel: torch")
    if device.type != "cuda" and not mod.INTERPRETED:
        raise ConfigError(f"loss.kernel = 'triton' on {device.type}: Triton kernels need CUDA, or the Triton "
                          "interpreter on the CPU (TRITON_INTERPRET=1 in the environment before Python starts; "
                          "slow, meant for tests). Use loss.kernel: auto or torch")
    if device.type == "cuda" and mod.INTERPRETED:
        warnings.warn("loss.kernel = 'triton' with TRITON_INTERPRET=1: the kernels run interpreted (slow)")
    return FusedInfoNCE()
