"""Split batch norm on the GPU (scripts/gpu_check.sh, step 7): exact under bf16 autocast, and what it costs.

    python scripts/gpu_check_split_bn.py                 # CUDA: ResNet-50 at 224, batch 256, bf16, channels-last
    python scripts/gpu_check_split_bn.py --device cpu --arch resnet18 --size 16 --batch 64   # the CPU twin

1. check: a SplitBatchNorm layer in training mode under autocast equals BatchNorm2d applied to each group alone
   (outputs, input gradients, running statistics), on random activations of several shapes.
2. time: forward + backward + SGD of the backbone with split BN (`--splits`, default 2 and 8) against plain batch
   norm, interleaved, medians; the share split BN adds to a step (target: at most 5% on the demo recipe).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn as nn

from fastft.encoder import build_backbone
from fastft.split_bn import SplitBatchNorm, split_norm_layer


def check(device: torch.device, dtype: torch.dtype) -> float:
    """The worst relative difference between split BN and per-group BatchNorm2d over a few shapes."""
    worst = 0.0
    g = torch.Generator(device="cpu").manual_seed(0)
    for n, c, hw, splits in [(64, 64, 56, 8), (256, 256, 14, 8), (32, 2048, 7, 2), (96, 128, 5, 3)]:
        x = (torch.randn(n, c, hw, hw, generator=g) * 2 + 0.5).to(device, memory_format=torch.channels_last)
        split = SplitBatchNorm(c, splits=splits).to(device).train()
        refs = [nn.BatchNorm2d(c).to(device).train() for _ in range(splits)]
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            ya = split(xa)
            yb = torch.cat([bn(chunk) for bn, chunk in zip(refs, xb.chunk(splits))])
        ya.float().sum().backward()
        yb.float().sum().backward()
        rel = lambda a, b: float(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).detach())
        mean = torch.stack([bn.running_mean for bn in refs]).mean(0)
        var = torch.stack([bn.running_var for bn in refs]).mean(0)
        worst = max(worst, rel(ya, yb), rel(xa.grad, xb.grad), rel(split.running_mean, mean),
                    rel(split.running_var, var))
    return worst


def step_ms(net: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer, dtype: torch.dtype, steps: int) -> float:
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = net(x).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    return 1000 * (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--splits", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check_split_bn: no CUDA device")
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    worst = check(device, dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    print(f"check: split BN vs BatchNorm2d per group under {str(dtype).removeprefix('torch.')}: worst relative "
          f"difference {worst:.2e} (tolerance {tol:.0e}) -> {'PASS' if worst <= tol else 'FAIL'}")

    small = args.size <= 64
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    nets = {"plain BN": build_backbone(args.arch, small)[0]}
    nets.update({f"split BN x{s}": build_backbone(args.arch, small, split_norm_layer(s))[0] for s in args.splits})
    runs: dict[str, list[float]] = {name: [] for name in nets}
    opts = {}
    for name, net in nets.items():
        nets[name] = net.to(device, memory_format=torch.channels_last).train()
        opts[name] = torch.optim.SGD(nets[name].parameters(), lr=0.01, momentum=0.9)
        step_ms(nets[name], x, opts[name], dtype, 2)  # warm-up (cuDNN picks its kernels)
    for _ in range(args.repeats):  # interleaved: A B C A B C ...
        for name in nets:
            runs[name].append(step_ms(nets[name], x, opts[name], dtype, args.steps))
    base = statistics.median(runs["plain BN"])
    print(f"\n{args.arch} at {args.size}, batch {args.batch}, {device}, {str(dtype).removeprefix('torch.')}, "
          f"channels-last; medians of {args.repeats} x {args.steps} steps (forward + backward + SGD)\n")
    print("| batch norm | ms per step | x plain |\n|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {statistics.median(r):.1f} | {statistics.median(r) / base:.3f} |")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
