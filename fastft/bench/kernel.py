"""The loss kernel alone: forward + backward of each loss module (fastft/loss.py) at the config's N (batch), K
(queue), C (dim), queue dtype and Feature Transformation variant, without score statistics: the fused Triton
kernel, where it runs, against the torch reference."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastft.config import Config, ConfigError
from fastft.feature_transform import NegativeMix
from fastft.loss import TorchInfoNCE, queue_dtype, select_loss

from .timing import Settings, device_sync, interleaved, progress


@dataclass
class KernelInputs:
    q: torch.Tensor
    k: torch.Tensor
    queue: torch.Tensor
    lam_p: float
    mix: NegativeMix | None
    temperature: float


def kernel_inputs(cfg: Config, device: torch.device) -> KernelInputs:
    """MoCo-like features at the config's N, K, C, queue dtype and FT variant (each lambda at its draw's mean)."""
    n, k, c = cfg.loader.batch_size, cfg.model.queue_size, cfg.model.dim
    g = torch.Generator().manual_seed(cfg.run.seed)
    q = F.normalize(torch.randn(n, c, generator=g), dim=1).to(device)
    key = F.normalize(torch.randn(n, c, generator=g), dim=1).to(device)
    queue = F.normalize(torch.randn(k, c, generator=g), dim=1).to(device, queue_dtype(cfg.loss.queue_dtype))
    lam_p = {"extrapolate": 1.5, "interpolate": 0.5}.get(cfg.ft.pos, 1.0)
    mix = None
    if cfg.ft.neg == "interpolate":
        perm = torch.randperm(k, generator=g).to(device)
        lam_n = torch.rand(k, c, generator=g).to(device) if cfg.ft.dim_mask in ("neg", "both") else 0.5
        mix = NegativeMix(lam_n, perm)
    return KernelInputs(q, key, queue, lam_p, mix, cfg.model.temperature)


def kernel_impls(cfg: Config, device: torch.device, x: KernelInputs) -> tuple[dict[str, nn.Module], str, list[str]]:
    """({name: loss module}, the name training uses (loss.kernel), notes on what could not be measured)."""
    impls: dict[str, nn.Module] = {"torch": TorchInfoNCE()}
    notes: list[str] = []
    fusable = x.mix is None or x.mix.scalar
    try:
        impls["triton"] = select_loss("triton", device, cfg.loss.tf32)
        from fastft.kernels import infonce_triton

        if infonce_triton.INTERPRETED:
            notes.append("triton runs under the interpreter (TRITON_INTERPRET=1): its times measure numpy on the "
                         "CPU, not the kernel")
        if not fusable:
            notes.append("triton: a per-element lam_n (ft.dim_mask: neg or both) is not fused; it runs the torch "
                         "loss")
    except ConfigError as e:
        if device.type == "cpu":
            notes.append("triton not measured: on the CPU it runs only under TRITON_INTERPRET=1 (interpreted, slow, "
                         "not kernel speed); GPU numbers come from `bash scripts/gpu_check.sh`")
        else:
            notes.append(f"triton not measured: {e}")
    used = "triton" if select_loss(cfg.loss.kernel, device).fused and fusable else "torch"
    return impls, used, notes


def time_kernel(loss: nn.Module, x: KernelInputs, iters: int, sync: Callable[[], None]) -> float:
    """ms per forward + backward of the loss, as MoCo calls it (gradient to q through q_hat and k_hat)."""
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        q = x.q.detach().requires_grad_()
        q_hat, k_hat = x.lam_p * q + (1 - x.lam_p) * x.k, x.lam_p * x.k + (1 - x.lam_p) * q
        loss(q_hat, k_hat, x.queue, x.temperature, x.mix).loss.backward()
    sync()
    return 1000 * (time.perf_counter() - start) / iters


def bench_kernel(cfg: Config, device: torch.device, s: Settings, notes: list[str]) -> dict:
    x = kernel_inputs(cfg, device)
    impls, used, why = kernel_impls(cfg, device, x)
    notes.extend(why)
    sync = device_sync(device)
    fns = {name: (lambda i, m=m: time_kernel(m, x, s.kernel_iters if i else 1, sync)) for name, m in impls.items()}
    with progress((s.repeats + 1) * len(fns), "kernel") as bar:
        runs = interleaved(fns, s.repeats, bar=bar)
    ms = {name: statistics.median(v) for name, v in runs.items()}
    return {
        "N": cfg.loader.batch_size, "K": cfg.model.queue_size, "C": cfg.model.dim,
        "interpolate": cfg.ft.neg == "interpolate", "queue_dtype": cfg.loss.queue_dtype, "used_by_training": used,
        "impls": {name: {"fwd_bwd_ms": ms[name], "speedup_vs_torch": ms["torch"] / ms[name], "runs_ms": runs[name]}
                  for name in impls},
    }
