"""The contrastive loss of a MoCo step: InfoNCE of (q_hat, k_hat) against the queue, or against this step's
negative interpolation of it (Feature Transformation's `NegativeMix`).

One interface, two implementations, chosen by `loss.kernel`:

    torch   TorchInfoNCE: kernels.reference on the negatives `NegativeMix.apply` forms; builds the [N, 1 + K]
            logits. Keeps the queue (or the mix) for backward.
    triton  TritonInfoNCE: kernels.infonce_triton, fused: no N x K logits, the mix formed in registers, the
            gradient accumulated during forward (the queue is not read again). Needs CUDA, or the Triton
            interpreter on the CPU (TRITON_INTERPRET=1 set before Python starts; slow, for tests). A per-element
            lam_n (`ft.dim_mask: neg | both`) is not fused: it runs the torch loss.
    auto    triton on CUDA, torch elsewhere (and torch when triton cannot be imported).

Both are modules called as loss(q_hat, k_hat, queue, T, mix, stats_bins) and return a `LossOutput`: the loss,
the positive scores and, when `stats_bins = (lo, hi, nbins)` is given, the negative-score statistics
(`NegStats`) that the score recorder logs. What they read after forward: the torch loss reads the queue during
backward, so the queue must not change before backward (MoCo.enqueue runs after it; autograd raises if it
does not); the fused loss reads nothing.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastft.kernels import NegStats, info_nce_loss, neg_score_stats

from .config import ConfigError
from .feature_transform import NegativeMix

QUEUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Bins = tuple[float, float, int]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    pos: torch.Tensor  # [N] fp32 positive scores q_hat . k_hat (NOT divided by T), detached
    neg: NegStats | None  # statistics of the negative scores q_hat . n_j, when stats_bins was given


def queue_dtype(name: str) -> torch.dtype:
    """`loss.queue_dtype` as a torch dtype (the storage of MoCo's queue; bf16/fp16 halve the bytes read)."""
    if name not in QUEUE_DTYPES:
        raise ConfigError(f"loss.queue_dtype = {name!r}: valid choices are {', '.join(map(repr, QUEUE_DTYPES))}")
    return QUEUE_DTYPES[name]


class TorchInfoNCE(nn.Module):
    """The pure-torch loss: the reference every fused kernel is checked against."""

    fused = False

    def forward(self, q_hat: torch.Tensor, k_hat: torch.Tensor, queue: torch.Tensor, temperature: float,
                mix: NegativeMix | None = None, stats_bins: Bins | None = None) -> LossOutput:
        negatives = queue if mix is None else mix.apply(queue)
        loss, logits = info_nce_loss(q_hat, k_hat, negatives, temperature)
        scores = logits.detach().float() * temperature
        neg = neg_score_stats(scores[:, 1:], temperature, stats_bins) if stats_bins is not None else None
        return LossOutput(loss, scores[:, 0], neg)


class TritonInfoNCE(nn.Module):
    """The fused Triton kernel (kernels/infonce_triton.py); per-element mixes go to the torch loss.

    `tf32` (loss.tf32): fp32 queues multiply on TF32 tensor cores (fast); False: full fp32 dot products, as the
    authors' torch code computes them (16-bit queues multiply in 16 bit either way)."""

    fused = True

    def __init__(self, tf32: bool = True):
        super().__init__()
        self.unfused = TorchInfoNCE()
        self.input_precision = "tf32" if tf32 else "ieee"

    def forward(self, q_hat: torch.Tensor, k_hat: torch.Tensor, queue: torch.Tensor, temperature: float,
                mix: NegativeMix | None = None, stats_bins: Bins | None = None) -> LossOutput:
        if mix is not None and not mix.scalar:
            return self.unfused(q_hat, k_hat, queue, temperature, mix, stats_bins)
        from fastft.kernels.infonce_triton import info_nce_loss_triton

        lam, perm = (mix.lam, mix.perm) if mix is not None else (None, None)
        loss, neg = info_nce_loss_triton(q_hat, k_hat, queue, temperature, lam, perm, stats_bins=stats_bins,
                                         input_precision=self.input_precision)
        with torch.no_grad():
            pos = (q_hat.float() * k_hat.float()).sum(1)
        return LossOutput(loss, pos, neg)


def _triton_module():
    """The kernel module, or the reason it cannot be used (triton missing or broken)."""
    try:
        from fastft.kernels import infonce_triton
    except Exception as e:  # ImportError, or a triton that fails on import: report, never crash `auto`
        return None, f"{type(e).__name__}: {e}"
    return infonce_triton, ""


def select_loss(kernel: str, device: torch.device, tf32: bool = True) -> nn.Module:
    """auto: the fastest implementation available on `device`; torch: the pure-torch reference; triton: fused
    (`tf32`: see TritonInfoNCE)."""
    if kernel not in ("auto", "torch", "triton"):
        raise ConfigError(f"loss.kernel = {kernel!r}: valid choices are 'auto', 'torch', 'triton'")
    if kernel == "torch" or (kernel == "auto" and device.type != "cuda"):
        return TorchInfoNCE()
    mod, why = _triton_module()
    if kernel == "auto":
        if mod is None or mod.INTERPRETED:  # interpreted kernels on a GPU would be far slower than torch
            why = "runs in interpreter mode (TRITON_INTERPRET=1)" if mod else f"failed to import: {why}"
            warnings.warn(f"loss.kernel = 'auto' on CUDA uses the torch reference: Triton {why}")
            return TorchInfoNCE()
        return TritonInfoNCE(tf32)
    if mod is None:
        raise ConfigError(f"loss.kernel = 'triton' but the Triton kernels cannot be imported ({why}); "
                          "use loss.kernel: torch")
    if device.type != "cuda" and not mod.INTERPRETED:
        raise ConfigError(f"loss.kernel = 'triton' on {device.type}: Triton kernels need CUDA, or the Triton "
                          "interpreter on the CPU (TRITON_INTERPRET=1 in the environment before Python starts; "
                          "slow, meant for tests). Use loss.kernel: auto or torch")
    if device.type == "cuda" and mod.INTERPRETED:
        warnings.warn("loss.kernel = 'triton' with TRITON_INTERPRET=1: the kernels run interpreted (slow)")
    return TritonInfoNCE(tf32)
