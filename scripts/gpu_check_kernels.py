"""GPU check of the fused InfoNCE kernels: correctness sweep against float64, then a benchmark table.

    python scripts/gpu_check_kernels.py check              # compiled kernels vs the float64 torch reference
    python scripts/gpu_check_kernels.py bench [--out DIR]  # fwd+bwd time and peak memory, Triton vs torch

Needs only torch and triton (the GPU check machine has nothing else): it imports fastft.kernels, and when the
project is not installed it maps the repository's kernels/ folder to fastft.kernels itself. Run by
scripts/gpu_check.sh, which also runs tests/test_kernel_triton.py when pytest is there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _import_kernels():
    """(infonce_triton, reference), installed or straight from the checkout (kernels/ -> fastft.kernels)."""
    try:
        from fastft.kernels import infonce_triton, reference
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import fastft

        fastft.__path__.append(str(ROOT))  # makes ROOT/kernels importable as fastft.kernels
        from fastft.kernels import infonce_triton, reference
    return infonce_triton, reference


it, ref = _import_kernels()
T = 0.07
BINS = (-0.3, 0.25, 50)


class Inputs(NamedTuple):
    q_hat: torch.Tensor
    k_hat: torch.Tensor
    queue: torch.Tensor
    lam: float | None
    perm: torch.Tensor | None


def mix(queue: torch.Tensor, lam: float | None, perm: torch.Tensor | None) -> torch.Tensor:
    """Feature Transformation's negative interpolation (fastft/feature_transform.py), written out: the negatives
    the kernel forms in registers and the reference takes ready-made."""
    return queue if perm is None else lam * queue + (1 - lam) * queue[perm]


def make_inputs(n: int, k: int, c: int, interp: bool, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """MoCo + FT-like features on the GPU: unit q, k, unit queue rows, extrapolated positives, random lam_n."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = F.normalize(torch.randn(n, c, device="cuda", generator=g), dim=1)
    key = F.normalize(torch.randn(n, c, device="cuda", generator=g), dim=1)
    lam_p = 1.5
    queue = F.normalize(torch.randn(k, c, device="cuda", generator=g), dim=1).to(dtype)
    perm = torch.randperm(k, device="cuda", generator=g) if interp else None
    return Inputs(lam_p * q + (1 - lam_p) * key, lam_p * key + (1 - lam_p) * q, queue, 0.37 if interp else None, perm)


# ------------------------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------------------------

class Tol(NamedTuple):
    values: float
    grads: float
    stats: float


def tolerance(dtype: torch.dtype, precision: str) -> Tol:
    if dtype != torch.float32:
        return Tol(1e-2, 1e-2, 2e-2)
    return Tol(2e-5, 2e-5, 2e-5) if precision == "ieee" else Tol(2e-3, 1e-2, 2e-3)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_case(n: int, k: int, c: int, interp: bool, dtype: torch.dtype, precision: str, backward: str) -> dict:
    x = make_inputs(n, k, c, interp, dtype, seed=n + k + c)
    q = x.q_hat.clone().requires_grad_()
    kh = x.k_hat.clone().requires_grad_()
    loss, stats = it.info_nce_loss_triton(q, kh, x.queue, T, x.lam, x.perm, stats_bins=BINS,
                                          backward=backward, input_precision=precision)
    loss.backward()
    q64 = x.q_hat.double().requires_grad_()
    k64 = x.k_hat.double().requires_grad_()
    ref_loss, logits = ref.info_nce_loss(q64, k64, mix(x.queue.double(), x.lam, x.perm), T)
    ref_loss.backward()
    s64 = logits.detach()[:, 1:] * T
    expect = ref.neg_score_stats(s64, T, BINS)
    tol = tolerance(dtype, precision)
    errs = {"loss": rel(loss.detach(), ref_loss.detach()), "grad_q": rel(q.grad, q64.grad),
            "grad_k": rel(kh.grad, k64.grad), "sumsq": rel(stats.sumsq, expect.sumsq),
            "sumexp": rel(stats.sumexp, expect.sumexp)}
    hist_off = (stats.hist - expect.hist).abs().sum().item() / (n * k)  # fraction of scores binned elsewhere
    ok = (errs["loss"] < tol.values and errs["grad_q"] < tol.grads and errs["grad_k"] < tol.grads
          and errs["sumsq"] < tol.stats and errs["sumexp"] < tol.stats and int(stats.hist.sum()) == n * k
          and hist_off < 0.02)
    del logits, s64, q64, k64
    return {"n": n, "k": k, "c": c, "interp": interp, "dtype": str(dtype).removeprefix("torch."),
            "precision": precision, "backward": backward, **{e: f"{v:.1e}" for e, v in errs.items()},
            "hist_moved": f"{hist_off:.1e}", "ok": ok}


def check(args: argparse.Namespace) -> int:
    cases = []
    # Small shapes, incl. non-multiples of every tile size (one fixed config each: no tuning). Compile time
    # grows with the kernel variants (C, dtype, precision, interpolation), not with the shapes.
    for n in (1, 7, 64):
        for k in (1, 100, 1000):
            for interp in (False, True):
                for c in (64, 128, 256):
                    cases.append((n, k, c, interp, torch.float32, "ieee", "fused"))
                for dtype, precision in ((torch.float32, "tf32"), (torch.bfloat16, "ieee")):
                    cases.append((n, k, 128, interp, dtype, precision, "fused"))
    for backward in ("fused", "recompute"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            cases.append((7, 1000, 128, True, dtype, "tf32", backward))
    # Tuned shapes: the training sizes, C 256, and K = 2^20.
    for interp in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            for backward in ("fused", "recompute"):
                cases.append((256, 65536, 128, interp, dtype, "tf32", backward))
    cases += [(1024, 262144, 128, True, torch.float32, "tf32", "fused"),
              (1024, 262144, 128, True, torch.bfloat16, "tf32", "fused"),
              (128, 32768, 256, True, torch.float32, "tf32", "fused"),
              (128, 32768, 256, True, torch.bfloat16, "tf32", "fused"),
              (256, 32768, 64, True, torch.float32, "ieee", "fused"),
              (64, 1 << 20, 128, True, torch.bfloat16, "tf32", "fused")]
    start, rows, failed = time.time(), [], 0
    for case in cases:
        try:
            row = check_case(*case)
        except Exception as e:  # report and go on: one bad variant should not hide the others
            row = {"case": str(case), "error": f"{type(e).__name__}: {str(e)[:300]}", "ok": False}
        failed += not row["ok"]
        if not row["ok"] or case[0] * case[1] >= 1 << 20:
            print(json.dumps(row), flush=True)
    print(f"kernel check: {len(cases) - failed}/{len(cases)} cases within tolerance ({time.time() - start:.0f} s)")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------------------

def torch_loss(tf32: bool) -> Callable:
    """The torch reference with the same call as the kernel: the mixed negatives are built in memory first."""
    def run(q_hat, k_hat, queue, temperature, lam, perm):
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            return ref.info_nce_loss(q_hat, k_hat, mix(queue, lam, perm), temperature)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    return run


IMPLS: dict[str, Callable] = {
    "torch": torch_loss(False),
    "torch-tf32": torch_loss(True),
    "triton": lambda *a: it.info_nce_loss_triton(*a),
    "triton-recompute": lambda *a: it.info_nce_loss_triton(*a, backward="recompute"),
}


def measure(impl: Callable, x: Inputs) -> tuple[float, float]:
    """(median ms of forward + backward, peak extra MiB during one forward + backward)."""
    from triton.testing import do_bench

    q = x.q_hat.clone().requires_grad_()
    kh = x.k_hat.clone().requires_grad_()

    def step():
        loss, _ = impl(q, kh, x.queue, T, x.lam, x.perm)
        loss.backward()

    step()  # compile / autotune
    torch.cuda.synchronize()
    q.grad = kh.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = do_bench(step, warmup=10, rep=60, grad_to_none=[q, kh])
    return float(ms), peak


def bench(args: argparse.Namespace) -> int:
    start = time.time()
    rows = []
    for n in (256, 1024):
        for k in (65536, 262144):
            for interp in (True, False):
                for dtype in (torch.float32, torch.bfloat16):
                    x = make_inputs(n, k, 128, interp, dtype)
                    base_ms = None
                    for name, impl in IMPLS.items():
                        if name == "triton-recompute" and n != 256:
                            continue  # the default (fused) is the one to compare; recompute at N 256 only
                        row = {"N": n, "K": k, "C": 128, "interp": interp, "queue": str(dtype).removeprefix("torch."),
                               "impl": name}
                        if time.time() - start > args.budget_s:
                            row["note"] = "skipped: time budget"
                            rows.append(row)
                            continue
                        try:
                            ms, peak = measure(impl, x)
                            base_ms = ms if name == "torch" else base_ms
                            row.update(ms=round(ms, 4), peak_mib=round(peak, 1),
                                       speedup=round(base_ms / ms, 2) if base_ms else None)
                            if name.startswith("triton"):
                                cfg = getattr(it._fwd_kernel, "best_config", None)
                                row["fwd_config"] = str(cfg) if cfg is not None else ""
                        except Exception as e:
                            row["note"] = f"{type(e).__name__}: {str(e)[:200]}"
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                    del x
                    torch.cuda.empty_cache()
    table = markdown(rows)
    print("\n" + table)
    verdict = target_verdict(rows)
    print(verdict)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "triton": __import__("triton").__version__, "seconds": round(time.time() - start, 1)}
        (out / "kernel_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "kernel_bench.md").write_text(f"{meta}\n\n{table}\n\n{verdict}\n")
        print(f"wrote {out / 'kernel_bench.json'} and {out / 'kernel_bench.md'}")
    return 0


def markdown(rows: list[dict]) -> str:
    cols = ["N", "K", "C", "interp", "queue", "impl", "ms", "speedup", "peak_mib", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    lines.append("\nms: median forward + backward (do_bench); speedup: vs `torch` (fp32 matmul, no TF32) on the same "
                 "row; peak_mib: peak extra CUDA memory during one forward + backward.")
    return "\n".join(lines)


def target_verdict(rows: list[dict]) -> str:
    """The issue's target: N 256, K 65536, C 128, interpolation: Triton >= 3x faster than torch, O(N) memory."""
    pick = {r["impl"]: r for r in rows
            if r["N"] == 256 and r["K"] == 65536 and r["interp"] and r["queue"] == "float32" and "ms" in r}
    if "torch" not in pick or "triton" not in pick:
        return "target (N 256, K 65536, interp, fp32): not measured"
    t, f = pick["torch"], pick["triton"]
    speed = t["ms"] / f["ms"]
    return (f"target (N 256, K 65536, C 128, interp, fp32 queue): triton {f['ms']:.3f} ms vs torch {t['ms']:.3f} ms "
            f"= {speed:.2f}x ({'met' if speed >= 3 else 'NOT met'}: >= 3x); peak extra memory "
            f"{f['peak_mib']:.1f} MiB vs {t['peak_mib']:.1f} MiB (N x K fp32 logits alone: "
            f"{256 * 65536 * 4 / 2**20:.0f} MiB)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="compiled kernels vs the float64 reference")
    b = sub.add_parser("bench", help="fwd+bwd time and peak memory, Triton vs torch")
    b.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for kernel_bench.{json,md} (default $OUT)")
    b.add_argument("--budget-s", type=float, default=240.0, help="stop starting new measurements after this")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check_kernels: no CUDA device", file=sys.stderr)
        return 2
    if it.INTERPRETED:
        print("gpu_check_kernels: TRITON_INTERPRET is set; unset it to check the compiled kernels", file=sys.stderr)
        return 2
    return check(args) if args.cmd == "check" else bench(args)


if __name__ == "__main__":
    sys.exit(main())
