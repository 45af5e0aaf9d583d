"""Fused InfoNCE against the MoCo queue in Triton: no N x K logits, no mixed queue in memory.

What it computes, for queries q_hat [N, C] and the queue [K, C]:

    n_j        = lam_n * queue_j + (1 - lam_n) * queue[perm[j]]      (or queue_j when perm is None)
    s_ij       = q_hat_i . n_j                                        negative scores, NOT divided by T
    lse_neg[i] = logsumexp_j(s_ij / T)
    loss       = mean_i(-pos_i / T + logaddexp(pos_i / T, lse_neg[i]))   pos_i = q_hat_i . k_hat_i

The mix n_j is Feature Transformation's negative interpolation, which fastft/feature_transform.py defines
(and draws lam_n and perm for); this kernel only implements that definition in registers, it does not own
it. The spec for this kernel is `reference.info_nce_loss(q_hat, k_hat, n, T)` applied to those mixed
negatives n (cross-entropy with target 0 over [pos, negatives] / T), and `reference.neg_score_stats` of the
scores q_hat @ n^T for the statistics.

How: one forward kernel streams the queue in [BLOCK_K, C] tiles, forms the interpolated negatives in
registers (a row of the queue and the row `perm` points at), takes the scores with `tl.dot` (that tile body
is `_negative_tile`, shared with the recompute backward kernel), and keeps an online max / sum per query row
(FlashAttention / Cut-Cross-Entropy style; exp2 with the log2(e) / T folded in). The K axis is split over several programs per row block so that small N still fills the GPU; a second,
tiny kernel merges the per-split (max, sum) partials. Everything O(N x C) (the positive, logaddexp, the
mean) stays in torch autograd, so gradients reach q_hat and k_hat through the positive as usual.

Gradient of lse_neg with respect to q_hat (the queue needs none):  d lse_neg[i] / d q_hat_i = E_i / T,
E_i = sum_j p_ij n_j, p_ij = softmax_j(s_ij / T). Two ways to get E, chosen by `backward`:
  - "fused" (default): the forward pass also accumulates E (the P @ V of attention, with V = the negatives),
    rescaled online like the sum. Backward is then O(N x C) torch; the queue is not needed after forward,
    so MoCo may overwrite it (enqueue) right away without a copy, and the queue is read once per step.
  - "recompute": the forward pass keeps only lse; a backward kernel re-streams the queue, recomputes the
    score tiles and accumulates E. The queue is saved for backward (autograd raises if it is modified in
    place before backward runs), so MoCo would need a copy of the queue: use it when that is acceptable.

Negative-score statistics (the visualization tool, `reference.NegStats`): pass `stats_bins=(lo, hi, nbins)`
and the same forward pass also returns per-row sum s, sum s^2, sum exp(s / T) and an int64 histogram of all
s_ij over `nbins` equal bins of [lo, hi) (out-of-range scores clamped into the end bins), exactly as
`reference.neg_score_stats` defines them. Without `stats_bins` that code is compiled out (no extra work).

API:
    info_nce_loss_triton(q_hat, k_hat, queue, T, lam_n=None, perm=None, *, stats_bins=None, ...)
        -> (loss, NegStats | None)      the loss of reference.info_nce_loss on the mixed negatives; in place
                                        of the [N, 1 + K] logits (never built) it returns the NegStats when
                                        `stats_bins` is given, else None. Pos scores are q_hat . k_hat:
                                        recompute them (O(N C)).
    neg_logsumexp(q_hat, queue, T, lam_n=None, perm=None, *, stats_bins=None, ...)
        -> (lse_neg [N] fp32, differentiable wrt q_hat; NegStats | None)

Queue storage: fp32, bf16 or fp16 (16-bit halves the bytes read). Accumulation is always fp32. The dot
products run in the storage precision: fp32 storage uses TF32 tensor cores on the GPU by default
(`input_precision="ieee"` for full fp32), 16-bit storage multiplies in that 16-bit type (q_hat is rounded to
it for the dot). Under TRITON_INTERPRET=1 (CPU) dots are numpy fp32 matmuls.

lam_n is one scalar per step (a float or a 0-dim tensor). A per-element lam_n (a [K, C] tensor,
`ft.dim_mask: elementwise`) is not fused: both entry points raise ValueError for it, and the caller
(fastft/loss.py) runs the torch loss instead.

Tile sizes are autotuned per (N bucket, K bucket, C, dtype, variant) on the GPU for K up to 2^20 and C in
{64, 128, 256}; problems under 2^22 scores, and the interpreter, use one fixed small configuration (no tuning).
The K axis is split so that ~2 programs per SM run even at small N; the partials are O(splits x N x C).
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl

from .reference import NegStats


def _interpreter_on() -> bool:
    """Whether `@triton.jit` below produces interpreted (CPU, numpy) kernels: fixed when this module is imported."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# True: the kernels run under the Triton interpreter (CPU tensors, slow); False: compiled (CUDA tensors only).
INTERPRETED: bool = _interpreter_on()

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
BackwardMode = Literal["fused", "recompute"]
Precision = Literal["tf32", "ieee"]
_STORAGE = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------------------------
# Tile configurations
# ---------------------------------------------------------------------------------------------------------------
# Row blocks of every config are multiples of this: histogram partials are stored per MIN_BLOCK_N rows, so
# their layout does not depend on which config the autotuner picks (see the end of _fwd_kernel). It is below
# the interpreter's BLOCK_N so that the slot-zeroing code runs in the CPU tests too.
MIN_BLOCK_N = 16
_INTERPRETER_CONFIG = (32, 64)  # (BLOCK_N, BLOCK_K): small enough to exercise several row blocks and tiles
# Tests set this: partial buffers are then filled with garbage instead of left uninitialised, proving that the
# kernels write every element the host later reads.
_POISON = False


def _configs() -> list[triton.Config]:
    if INTERPRETED:
        bn, bk = _INTERPRETER_CONFIG
        return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=1)]
    # (BLOCK_N, BLOCK_K, warps, stages). Registers hold the E accumulator [BN, C] and the scores [BN, BK];
    # shared memory the pipelined queue tiles (two per stage when interpolating) and the dot operands, so the
    # big tiles only fit 16-bit queues at C <= 128 (see _prune); the small ones are the fallback for C = 256.
    shapes = [(16, 32, 4, 1), (32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 8, 3),
              (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in shapes]


def _shared_bytes(cfg: triton.Config, block_c: int, storage_bytes: int, two_tiles: bool) -> int:
    """A rough upper bound of the shared memory a config needs: pipelined queue tiles + dot operands."""
    bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    stages = max(1, cfg.num_stages) * (2 if two_tiles else 1) * bk * block_c * storage_bytes
    return stages + (bn + bk) * block_c * storage_bytes + bn * bk * storage_bytes


# Small problems (N x K below this) skip tuning: one config, compiled once per kernel variant. Tuning is
# worth its ~0.3 s per config only where the kernel itself takes long enough to matter.
_TUNE_MIN_SCORES = 1 << 22
_SMALL_PREFERENCE = [(32, 64), (32, 32), (16, 32)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop row tiles far larger than N and configs whose tiles cannot fit in shared memory (227 KiB on
    H100/H200; the estimate errs high); configs that still fail to launch are skipped by the autotuner itself.
    Small problems get a single config (the autotuner then does not benchmark)."""
    n, k, block_c = kwargs.get("TUNE_N", 1024), kwargs.get("TUNE_K", 1 << 16), kwargs.get("BLOCK_C", 128)
    storage_bytes = 4 if kwargs.get("DOT_FP32", True) else 2
    fits = [cfg for cfg in configs
            if _shared_bytes(cfg, block_c, storage_bytes, kwargs.get("HAS_PERM", True)) <= 227 * 1024]
    if n * k < _TUNE_MIN_SCORES:
        for shape in _SMALL_PREFERENCE:
            for cfg in fits:
                if (cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]) == shape:
                    return [cfg]
    keep = [cfg for cfg in fits if cfg.kwargs["BLOCK_N"] <= max(32, n)]
    return keep or configs[:1]


def _autotune(**kw):
    """triton.autotune with short benchmarks where this triton supports `do_bench` (3.2+): tuning a new shape
    then costs ~0.3 s per config instead of ~1.5 s."""
    if "do_bench" in inspect.signature(triton.autotune).parameters and not INTERPRETED:
        from triton.testing import do_bench
        kw["do_bench"] = lambda fn, quantiles: do_bench(fn, warmup=5, rep=25, quantiles=quantiles)
    return triton.autotune(configs=_configs(), prune_configs_by={"early_config_prune": _prune}, **kw)


_TUNE_KEY = ["TUNE_N", "TUNE_K", "BLOCK_C", "HAS_PERM", "STATS", "WITH_GRAD", "PRECISION"]

# ---------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _operand(x, queue_ptr, DOT_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 `x` as a dot operand in the queue's storage type (unchanged for fp32 storage), rounded to nearest.

    UPCAST (interpreter, 16-bit storage): the rounded value stays fp32, because the interpreter's dot cannot
    read bf16 (it keeps raw bits) and its fp32 -> bf16 cast truncates; bf16 rounding is done on the bits here.
    """
    if DOT_FP32:
        out = x
    elif UPCAST:
        if queue_ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # round half to even, keep 8 mantissa bits
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = x.to(tl.float16).to(tl.float32)
    else:
        out = x.to(queue_ptr.dtype.element_ty)
    return out


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (interpreter, 16-bit storage): multiply the already-rounded values
    in fp32, the same numbers a tensor core produces from 16-bit operands (exact products, fp32 sums)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _program_block(q_ptr, queue_ptr, N, K, C, k_per_split, stride_q,
                   DOT_FP32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a program of _fwd_kernel / _bwd_kernel works on: its row block (grid axis 0) with the queries of
    those rows as a dot operand, and its share [k_lo, k_hi) of the queue (grid axis 1, the K split).

    Returns (pid_n, pid_s, rows, row_ok, cols, col_ok, q, k_lo, k_hi); q is [BLOCK_N, BLOCK_C], zero outside
    the N x C block, in the queue's storage type (16-bit storage: multiplied in that type, as the queue).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    q = _operand(q, queue_ptr, DOT_FP32, UPCAST)
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    return pid_n, pid_s, rows, row_ok, cols, col_ok, q, k_lo, k_hi


@triton.jit
def _negative_tile(q, queue_ptr, perm_ptr, k0, k_hi, cols, col_ok, stride_queue, lam, scale2,
                   HAS_PERM: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """The negatives k0 .. k0 + BLOCK_K (those below k_hi) and their scores against the row block's q.

    HAS_PERM: the negative is Feature Transformation's interpolation lam * queue_j + (1 - lam) * queue[perm_j]
    (fastft/feature_transform.py), formed here in fp32 from two loaded rows and never written anywhere.
    Returns (neg [BLOCK_K, BLOCK_C] as a dot operand, k_ok [BLOCK_K], s = q . neg [BLOCK_N, BLOCK_K] fp32,
    x = s * scale2 with -inf in the columns past k_hi).
    """
    ks = k0 + tl.arange(0, BLOCK_K)
    k_ok = ks < k_hi
    tile_ok = k_ok[:, None] & col_ok[None, :]
    neg = tl.load(queue_ptr + ks[:, None] * stride_queue + cols[None, :], mask=tile_ok, other=0.0)
    if HAS_PERM:
        pk = tl.load(perm_ptr + ks, mask=k_ok, other=0)
        other = tl.load(queue_ptr + pk[:, None] * stride_queue + cols[None, :], mask=tile_ok, other=0.0)
        neg = _operand(lam * neg.to(tl.float32) + (1.0 - lam) * other.to(tl.float32), queue_ptr, DOT_FP32, UPCAST)
    s = _dot(q, tl.trans(neg), PRECISION, UPCAST)
    x = tl.where(k_ok[None, :], s * scale2, float("-inf"))
    return neg, k_ok, s, x


@_autotune(key=_TUNE_KEY)
@triton.jit
def _fwd_kernel(
    q_ptr, queue_ptr, perm_ptr,  # [N, C] fp32, [K, C] fp32/bf16/fp16, [K] int
    m_ptr, l_ptr,  # [S, N] fp32: per split, running max of x = s * log2(e) / T and sum of exp2(x - max)
    e_ptr,  # [S, N, C] fp32: per split, sum_j exp2(x_ij - max_i) n_j (WITH_GRAD)
    sum_ptr, sumsq_ptr,  # [S, N] fp32: per split, sum_j s_ij and sum_j s_ij^2 (STATS)
    hist_ptr,  # [S, ceil(N / MIN_BLOCK_N), HIST] int32 partial histograms (STATS)
    N, K, C, k_per_split, n_slots, stride_q, stride_queue,
    lam, scale2, lo, bin_scale,  # lam_n; log2(e) / T; histogram lower edge; nbins / (hi - lo)
    TUNE_N, TUNE_K,  # autotune key only (bucketed N and K)
    BLOCK_C: tl.constexpr, HAS_PERM: tl.constexpr, STATS: tl.constexpr, WITH_GRAD: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, NBINS: tl.constexpr, HIST: tl.constexpr,
    MIN_BN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n, pid_s, rows, row_ok, cols, col_ok, q, k_lo, k_hi = _program_block(
        q_ptr, queue_ptr, N, K, C, k_per_split, stride_q, DOT_FP32, UPCAST, BLOCK_C, BLOCK_N)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_N], tl.float32)
    e = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    s_sum = tl.zeros([BLOCK_N], tl.float32)
    s_sq = tl.zeros([BLOCK_N], tl.float32)
    hist = tl.zeros([HIST], tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        neg, k_ok, s, x = _negative_tile(q, queue_ptr, perm_ptr, k0, k_hi, cols, col_ok, stride_queue, lam, scale2,
                                         HAS_PERM, DOT_FP32, PRECISION, UPCAST, BLOCK_K)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        alpha = tl.exp2(m - m_new)  # rescales what was summed under the previous max (0 on the first tile)
        p = tl.exp2(x - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if WITH_GRAD:
            e = e * alpha[:, None] + _dot(_operand(p, queue_ptr, DOT_FP32, UPCAST), neg, PRECISION, UPCAST)
        m = m_new
        if STATS:
            sv = tl.where(k_ok[None, :], s, 0.0)
            s_sum += tl.sum(sv, axis=1)
            s_sq += tl.sum(sv * sv, axis=1)
            # reference.histogram_bins: floor((s - lo) * nbins / (hi - lo)) clamped into [0, nbins - 1]; padding
            # rows/columns go to the spare bin NBINS (< HIST), which is dropped on the host.
            b = tl.minimum(tl.maximum(tl.floor((s - lo) * bin_scale), 0.0), NBINS - 1.0).to(tl.int32)
            b = tl.where(row_ok[:, None] & k_ok[None, :], b, NBINS)
            hist += tl.histogram(tl.reshape(b, [BLOCK_N * BLOCK_K], can_reorder=True), HIST)

    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)
    if WITH_GRAD:
        tl.store(e_ptr + out[:, None] * C + cols[None, :], e, mask=row_ok[:, None] & col_ok[None, :])
    if STATS:
        tl.store(sum_ptr + out, s_sum, mask=row_ok)
        tl.store(sumsq_ptr + out, s_sq, mask=row_ok)
        # This program covers BLOCK_N // MIN_BN histogram slots: its counts go to the first, zeros to the rest.
        # Every slot is thus written on every launch whatever BLOCK_N the autotuner picked (its benchmark runs
        # with other configs leave no stale counts), and the result is deterministic (no atomics).
        bins = tl.arange(0, HIST)
        slot = pid_s * n_slots + pid_n * (BLOCK_N // MIN_BN)
        tl.store(hist_ptr + slot * HIST + bins, hist)
        for r in tl.static_range(1, BLOCK_N // MIN_BN):
            ok = pid_n * (BLOCK_N // MIN_BN) + r < n_slots
            tl.store(hist_ptr + (slot + r) * HIST + bins, tl.zeros([HIST], tl.int32), mask=(bins >= 0) & ok)


@triton.jit
def _merge_kernel(m_ptr, l_ptr, e_ptr, lse2_ptr, lse_ptr, eout_ptr, N, C, S,
                  WITH_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge the per-split partials: lse2 = log2 sum_s l_s 2^m_s, E = sum_s 2^(m_s - lse2) e_s."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    big = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for s in range(0, S):
        big = tl.maximum(big, tl.load(m_ptr + s * N + rows, mask=row_ok, other=0.0))
    total = tl.zeros([BLOCK_N], tl.float32)
    for s in range(0, S):
        ms = tl.load(m_ptr + s * N + rows, mask=row_ok, other=0.0)
        total += tl.load(l_ptr + s * N + rows, mask=row_ok, other=1.0) * tl.exp2(ms - big)
    lse2 = big + tl.log2(total)
    tl.store(lse2_ptr + rows, lse2, mask=row_ok)
    tl.store(lse_ptr + rows, lse2 * 0.6931471805599453, mask=row_ok)
    if WITH_GRAD:
        cols = tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < C)[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for s in range(0, S):
            w = tl.exp2(tl.load(m_ptr + s * N + rows, mask=row_ok, other=0.0) - lse2)
            acc += w[:, None] * tl.load(e_ptr + (s * N + rows)[:, None] * C + cols[None, :], mask=ok, other=0.0)
        tl.store(eout_ptr + rows[:, None] * C + cols[None, :], acc, mask=ok)


@_autotune(key=_TUNE_KEY)
@triton.jit
def _bwd_kernel(
    q_ptr, queue_ptr, perm_ptr, lse2_ptr,  # lse2: [N] fp32, log2 of sum_j 2^x_ij (from the forward merge)
    e_ptr,  # [S, N, C] fp32 out: per split, sum_j p_ij n_j with p_ij = 2^(x_ij - lse2_i)
    N, K, C, k_per_split, stride_q, stride_queue, lam, scale2,
    TUNE_N, TUNE_K,
    BLOCK_C: tl.constexpr, HAS_PERM: tl.constexpr, STATS: tl.constexpr, WITH_GRAD: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The "recompute" backward: re-stream the queue, rebuild the score tiles, accumulate P @ negatives."""
    pid_n, pid_s, rows, row_ok, cols, col_ok, q, k_lo, k_hi = _program_block(
        q_ptr, queue_ptr, N, K, C, k_per_split, stride_q, DOT_FP32, UPCAST, BLOCK_C, BLOCK_N)
    lse2 = tl.load(lse2_ptr + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        neg, k_ok, s, x = _negative_tile(q, queue_ptr, perm_ptr, k0, k_hi, cols, col_ok, stride_queue, lam, scale2,
                                         HAS_PERM, DOT_FP32, PRECISION, UPCAST, BLOCK_K)
        p = tl.exp2(x - lse2[:, None])
        acc += _dot(_operand(p, queue_ptr, DOT_FP32, UPCAST), neg, PRECISION, UPCAST)
    out = pid_s * N + rows
    tl.store(e_ptr + out[:, None] * C + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """How the K axis is split over programs (independent of the tile config the autotuner picks)."""
    splits: int
    k_per_split: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_plan(n: int, k: int, device: torch.device, k_per_split: int | None = None) -> _Plan:
    """Enough programs to fill the GPU (~2 per SM) even at small N, each streaming >= ~1024 negatives.

    Under the interpreter, splits of 512 (so K = 1000 exercises the merge). `k_per_split` forces a split size.
    """
    if k_per_split is None:
        if device.type == "cuda":
            sms = _sm_count(device)
            row_blocks = _cdiv(n, 64)
            splits = max(1, min(_cdiv(2 * sms, row_blocks), _cdiv(k, 1024)))
            k_per_split = _cdiv(_cdiv(k, splits), 256) * 256  # whole tiles for every BLOCK_K <= 256
        else:
            k_per_split = 512
    # int32 histogram partials: a program counts at most BLOCK_N (<= 128) x k_per_split scores.
    k_per_split = max(1, min(k_per_split, 1 << 22))
    return _Plan(_cdiv(k, k_per_split), k_per_split)


def _check_inputs(q_hat: torch.Tensor, queue: torch.Tensor, perm: torch.Tensor | None) -> None:
    if q_hat.dim() != 2 or queue.dim() != 2 or q_hat.shape[1] != queue.shape[1] or 0 in q_hat.shape + queue.shape:
        raise ValueError(f"q_hat [N, C] and queue [K, C] (non-empty) expected, got {tuple(q_hat.shape)} and "
                         f"{tuple(queue.shape)}")
    if queue.dtype not in _STORAGE:
        raise TypeError(f"queue dtype {queue.dtype}: the kernel reads fp32, bf16 or fp16 queues")
    if q_hat.device != queue.device:
        raise ValueError(f"q_hat on {q_hat.device} but queue on {queue.device}")
    if perm is not None and (perm.shape != (queue.shape[0],) or perm.dtype not in (torch.int32, torch.int64)
                             or perm.device != queue.device):
        raise ValueError(f"perm must be an int32/int64 permutation of shape [{queue.shape[0]}] on {queue.device}, "
                         f"got {perm.dtype} {tuple(perm.shape)} on {perm.device}")
    if not INTERPRETED and q_hat.device.type != "cuda":
        raise RuntimeError(
            "the Triton kernels were compiled for CUDA but got CPU tensors. On the CPU run them under the "
            "interpreter: set TRITON_INTERPRET=1 in the environment before Python starts (or use the torch "
            "reference, loss.kernel: torch)")


def _bucket(x: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(1, x)), cap)


class _Launch(NamedTuple):
    """What the kernels need besides the tensors: shared by forward and the recompute backward."""
    plan: _Plan
    lam: float
    scale2: float
    meta: dict


def _launch_args(q: torch.Tensor, queue: torch.Tensor, perm: torch.Tensor | None, lam: float, temperature: float,
                 precision: Precision, k_per_split: int | None) -> _Launch:
    n, c = q.shape
    k = queue.shape[0]
    fp32 = queue.dtype == torch.float32
    meta = dict(TUNE_N=_bucket(n, 1024), TUNE_K=_bucket(k, 1 << 20), BLOCK_C=max(16, triton.next_power_of_2(c)),
                HAS_PERM=perm is not None, DOT_FP32=fp32, UPCAST=INTERPRETED and not fp32,
                # 16-bit operands multiply exactly into fp32 ("ieee"); the choice only matters for fp32 storage.
                PRECISION=precision if fp32 else "ieee")
    return _Launch(_split_plan(n, k, q.device, k_per_split), float(lam), LOG2E / temperature, meta)


class _FwdOut(NamedTuple):
    lse: torch.Tensor  # [N] natural log
    lse2: torch.Tensor  # [N] log2
    e: torch.Tensor | None  # [N, C] sum_j p_ij n_j (WITH_GRAD)
    stats: NegStats | None


def _alloc(*shape: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, -7 if dtype == torch.int32 else float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def _forward(q: torch.Tensor, queue: torch.Tensor, perm: torch.Tensor | None, run: _Launch,
             stats_bins: tuple[float, float, int] | None, with_grad: bool) -> _FwdOut:
    n, c = q.shape
    k = queue.shape[0]
    plan, dev = run.plan, q.device
    m = _alloc(plan.splits, n, device=dev)
    l = _alloc(plan.splits, n, device=dev)
    e = _alloc(plan.splits, n, c, device=dev) if with_grad else m  # placeholder pointer when unused
    stats = stats_bins is not None
    if stats:
        lo, hi, nbins = float(stats_bins[0]), float(stats_bins[1]), int(stats_bins[2])
        if not (hi > lo and nbins >= 1):
            raise ValueError(f"stats_bins (lo, hi, nbins) = {stats_bins}: need hi > lo and nbins >= 1")
        # + a spare bin for padding; >= 32 because the GPU histogram works on at least one bin per lane.
        hist_size = max(32, triton.next_power_of_2(nbins + 1))
        n_slots = _cdiv(n, MIN_BLOCK_N)
        s_sum, s_sq = _alloc(plan.splits, n, device=dev), _alloc(plan.splits, n, device=dev)
        hist = _alloc(plan.splits, n_slots, hist_size, device=dev, dtype=torch.int32)
        # As reference.histogram_bins: (s - lo) * (nbins / (hi - lo)) with the factor rounded to fp32 once.
        bin_scale = float(torch.tensor(nbins / (hi - lo), dtype=torch.float32))
    else:
        lo, nbins, hist_size, n_slots, bin_scale = 0.0, 1, 2, 1, 1.0
        s_sum = s_sq = hist = m
    perm_arg = perm if perm is not None else m  # never read when HAS_PERM is False

    def grid(meta: dict) -> tuple[int, int]:
        return (_cdiv(n, meta["BLOCK_N"]), plan.splits)

    _fwd_kernel[grid](
        q, queue, perm_arg, m, l, e, s_sum, s_sq, hist,
        n, k, c, plan.k_per_split, n_slots, q.stride(0), queue.stride(0),
        run.lam, run.scale2, lo, bin_scale,
        STATS=stats, WITH_GRAD=with_grad, NBINS=nbins, HIST=hist_size, MIN_BN=MIN_BLOCK_N, **run.meta)

    lse2, lse = _alloc(n, device=dev), _alloc(n, device=dev)
    e_out = _alloc(n, c, device=dev) if with_grad else None
    merge_bn = 16
    _merge_kernel[(_cdiv(n, merge_bn),)](
        m, l, e, lse2, lse, e_out if with_grad else lse, n, c, plan.splits,
        WITH_GRAD=with_grad, BLOCK_N=merge_bn, BLOCK_C=run.meta["BLOCK_C"])

    neg_stats = None
    if stats:
        # sum_j exp(s_ij / T) = exp(lse_neg): exact in float64 from the merged log-sum, no extra pass.
        sumexp = torch.exp2(lse2.double()).float()
        counts = hist[:, :, :nbins].sum(dim=(0, 1), dtype=torch.int64)
        neg_stats = NegStats(s_sum.sum(0), s_sq.sum(0), sumexp, counts)
    return _FwdOut(lse, lse2, e_out, neg_stats)


def _recompute_e(q: torch.Tensor, queue: torch.Tensor, perm: torch.Tensor | None, lse2: torch.Tensor,
                 run: _Launch) -> torch.Tensor:
    n, c = q.shape
    plan = run.plan
    parts = _alloc(plan.splits, n, c, device=q.device)

    def grid(meta: dict) -> tuple[int, int]:
        return (_cdiv(n, meta["BLOCK_N"]), plan.splits)

    _bwd_kernel[grid](
        q, queue, perm if perm is not None else lse2, lse2, parts,
        n, queue.shape[0], c, plan.k_per_split, q.stride(0), queue.stride(0), run.lam, run.scale2,
        STATS=False, WITH_GRAD=True, **run.meta)
    return parts.sum(0)


class NegLogSumExp(torch.autograd.Function):
    """lse_neg [N] (differentiable wrt q_hat) plus the optional NegStats tensors (not differentiable)."""

    @staticmethod
    def forward(ctx, q_hat: torch.Tensor, queue: torch.Tensor, perm: torch.Tensor | None, lam: float,
                temperature: float, stats_bins: tuple[float, float, int] | None, backward: BackwardMode,
                precision: Precision, k_per_split: int | None):
        q = q_hat.detach().float().contiguous()
        queue = queue.detach()
        if queue.stride(1) != 1:
            queue = queue.contiguous()
        run = _launch_args(q, queue, perm, lam, temperature, precision, k_per_split)
        fused = backward == "fused" and ctx.needs_input_grad[0]
        out = _forward(q, queue, perm, run, stats_bins, with_grad=fused)
        ctx.temperature, ctx.mode, ctx.run, ctx.q_dtype = temperature, backward, run, q_hat.dtype
        if fused:
            ctx.save_for_backward(out.e)
        elif ctx.needs_input_grad[0]:
            # Saved, not copied: autograd raises if the queue is modified in place before backward.
            ctx.save_for_backward(q, queue, perm, out.lse2)
        st = out.stats
        if st is None:  # autograd.Function outputs must be tensors: distinct empty ones
            st = NegStats(*(torch.empty(0, device=q.device) for _ in range(3)),
                          torch.empty(0, device=q.device, dtype=torch.int64))
        ctx.mark_non_differentiable(*st)
        return (out.lse, *st)

    @staticmethod
    def backward(ctx, g_lse: torch.Tensor, *unused):
        if ctx.mode == "fused":
            (e,) = ctx.saved_tensors
        else:
            q, queue, perm, lse2 = ctx.saved_tensors
            e = _recompute_e(q, queue, perm, lse2, ctx.run)
        grad = (g_lse.float() / ctx.temperature)[:, None] * e
        return grad.to(ctx.q_dtype), None, None, None, None, None, None, None, None


def _scalar_lambda(lam_n: float | torch.Tensor | None, perm: torch.Tensor | None) -> float:
    if isinstance(lam_n, torch.Tensor) and lam_n.dim() > 0:
        raise ValueError(f"lam_n of shape {tuple(lam_n.shape)}: per-element lam_n is not fused; use the torch "
                         "loss (the kernel takes one scalar lam_n, a float or a 0-dim tensor)")
    if perm is None:
        return 1.0  # no interpolation: lam_n is not used (as in the reference)
    if lam_n is None:
        raise ValueError("perm given without lam_n")
    return float(lam_n)


def neg_logsumexp(q_hat: torch.Tensor, queue: torch.Tensor, temperature: float,
                  lam_n: float | torch.Tensor | None = None, perm: torch.Tensor | None = None, *,
                  stats_bins: tuple[float, float, int] | None = None, backward: BackwardMode = "fused",
                  input_precision: Precision = "tf32", k_per_split: int | None = None
                  ) -> tuple[torch.Tensor, NegStats | None]:
    """lse_neg[i] = logsumexp_j(q_hat_i . n_j / T) over the (interpolated) queue, and the NegStats if asked.

    lam_n: a float (or 0-dim tensor; a per-element tensor raises ValueError); perm: [K] permutation, None = no
    interpolation. stats_bins: (lo, hi,
    nbins) to also return reference.NegStats of the scores. backward / input_precision: see the module
    docstring. k_per_split: force the K split size (tests); None picks one for the device.
    """
    _check_inputs(q_hat, queue, perm)
    if backward not in ("fused", "recompute"):
        raise ValueError(f"backward = {backward!r}: expected 'fused' or 'recompute'")
    if input_precision not in ("tf32", "ieee"):
        raise ValueError(f"input_precision = {input_precision!r}: expected 'tf32' or 'ieee'")
    lam = _scalar_lambda(lam_n, perm)
    lse, *st = NegLogSumExp.apply(q_hat, queue, perm, lam, float(temperature), stats_bins, backward,
                                  input_precision, k_per_split)
    return lse, (NegStats(*st) if stats_bins is not None else None)


def info_nce_loss_triton(q_hat: torch.Tensor, k_hat: torch.Tensor, queue: torch.Tensor, temperature: float,
                         lam_n: float | torch.Tensor | None = None, perm: torch.Tensor | None = None, *,
                         stats_bins: tuple[float, float, int] | None = None, backward: BackwardMode = "fused",
                         input_precision: Precision = "tf32") -> tuple[torch.Tensor, NegStats | None]:
    """reference.info_nce_loss, fused: (loss, NegStats or None) instead of (loss, logits).

    The second value is the NegStats of the negative scores when `stats_bins` = (lo, hi, nbins) is given,
    else None: the [N, 1 + K] logits are never built. lam_n is one scalar (a float or a 0-dim tensor); a
    per-element lam_n ([K, C] tensor) raises ValueError: it is not fused, the torch loss handles it.
    """
    lse_neg, stats = neg_logsumexp(q_hat, queue, temperature, lam_n, perm, stats_bins=stats_bins,
                                   backward=backward, input_precision=input_precision)
    pos = (q_hat.float() * k_hat.float()).sum(dim=1) / temperature
    loss = (torch.logaddexp(pos, lse_neg) - pos).mean()
    return loss, stats
