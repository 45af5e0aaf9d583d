"""The fused Triton InfoNCE kernels (kernels/infonce_triton.py) against the float64 torch reference.

Without a GPU the kernels run under the Triton interpreter (numpy on the CPU). TRITON_INTERPRET=1 must be set
before triton is first imported (triton decorates its own library functions at import, and torch imports
triton early), so in a plain CPU `pytest` run this file turns into one test that runs the file again in a
child process with TRITON_INTERPRET=1 set: no other test ever sees the variable. With CUDA
(scripts/gpu_check.sh) the tests run compiled, in-process, with the tolerances of tf32/bf16 dot products.
Shapes stay small: the interpreter takes ~1 s for N 64, K 1000, C 128.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from conftest import run_under_interpreter

from fastft.kernels import reference as ref

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# Run the kernel tests in this process: on the GPU, or on the CPU when the interpreter is on from the start.
RUN_HERE = ON_GPU or os.environ.get("TRITON_INTERPRET", "0") == "1"

if RUN_HERE:
    from fastft.kernels import infonce_triton as it

    assert it.INTERPRETED != ON_GPU, "TRITON_INTERPRET=1 with CUDA: unset it to test the compiled kernels"


def test_kernels_under_the_interpreter():
    """The CPU entry point: every test below, in a child process with the Triton interpreter on."""
    run_under_interpreter(__file__, min_passed=50)  # the child really ran the suite


@pytest.fixture(autouse=True)
def poison_partials(monkeypatch):
    """Partial buffers full of NaN / -7 instead of uninitialised memory: any element a kernel forgets to
    write then shows up in the results."""
    if RUN_HERE:
        monkeypatch.setattr(it, "_POISON", True)


# --------------------------------------------------------------------------------------------------------------
# Inputs and tolerances
# --------------------------------------------------------------------------------------------------------------

class Case(NamedTuple):
    q_hat: torch.Tensor  # [N, C] fp32
    k_hat: torch.Tensor  # [N, C] fp32
    queue: torch.Tensor  # [K, C] storage dtype
    lam: float | None
    perm: torch.Tensor | None


def make_case(n: int, k: int, c: int, interp: bool, dtype: torch.dtype = torch.float32, seed: int = 0,
              scale: float = 1.0) -> Case:
    """Features as MoCo + FT makes them: unit q, k, a queue of unit keys, extrapolated positives (lam_p in
    [1, 2]: |q_hat| up to ~3), a random lam_n and permutation. Random everywhere, never zeros."""
    g = torch.Generator().manual_seed(seed * 1000 + n * 7 + k * 13 + c + interp)
    q = F.normalize(torch.randn(n, c, generator=g), dim=1)
    key = F.normalize(torch.randn(n, c, generator=g), dim=1)
    lam_p = 1 + torch.rand((), generator=g).item()
    q_hat = scale * (lam_p * q + (1 - lam_p) * key)
    k_hat = lam_p * key + (1 - lam_p) * q
    queue = F.normalize(torch.randn(k, c, generator=g), dim=1).to(dtype)
    lam = 0.1 + 0.8 * torch.rand((), generator=g).item() if interp else None
    perm = torch.randperm(k, generator=g) if interp else None
    return Case(q_hat.to(DEVICE), k_hat.to(DEVICE), queue.to(DEVICE), lam, None if perm is None else perm.to(DEVICE))


class Tol(NamedTuple):
    values: float  # loss and per-row lse_neg, relative (max-norm)
    grads: float  # gradients, relative (max-norm)
    stats: float  # sum / sumsq / sumexp, relative (sum: to sum_j |s_ij|)
    edge: float  # |score - bin edge| below which a score may land in either bin


def tolerance(dtype: torch.dtype, precision: str = "tf32") -> Tol:
    if dtype != torch.float32:  # 16-bit operands for the dot products (q_hat rounded too)
        return Tol(1e-2, 1e-2, 2e-2, 1.5e-3)
    if not ON_GPU:  # the interpreter multiplies in numpy fp32
        return Tol(1e-5, 1e-5, 1e-5, 1e-5)
    if precision == "ieee":
        return Tol(2e-5, 2e-5, 2e-5, 1e-5)
    return Tol(2e-3, 1e-2, 2e-3, 5e-4)  # tf32: 10-bit mantissa inputs


# The default on the GPU is "ieee" for fp32 so that the bulk of the checks are tight; tf32 has its own test.
PRECISION = "ieee" if ON_GPU else "tf32"
T = 0.07  # MoCo v1's temperature: the sharpest softmax of the two defaults


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def mix(queue: torch.Tensor, lam: float | torch.Tensor | None, perm: torch.Tensor | None) -> torch.Tensor:
    """Feature Transformation's negative interpolation, written out: the negatives the kernel forms in registers."""
    return queue if perm is None else lam * queue + (1 - lam) * queue[perm]


def negatives(case: Case) -> torch.Tensor:
    """The float64 negatives of a case: its (possibly 16-bit) stored queue values, mixed when it interpolates."""
    return mix(case.queue.double(), case.lam, case.perm)


def reference(case: Case, temperature: float = T):
    """Float64 loss, logits, and grads wrt q_hat and k_hat from the stored (possibly 16-bit) queue values."""
    q = case.q_hat.detach().double().requires_grad_()
    k = case.k_hat.detach().double().requires_grad_()
    loss, logits = ref.info_nce_loss(q, k, negatives(case), temperature)
    loss.backward()
    return loss.detach(), logits.detach(), q.grad, k.grad


# --------------------------------------------------------------------------------------------------------------
# Forward values and gradients
# --------------------------------------------------------------------------------------------------------------

SHAPES = [(n, k, c) for n in (1, 7, 64) for k in (1, 100, 1000) for c in (64, 128)]


@pytest.mark.parametrize("interp", [False, True], ids=["plain", "interp"])
@pytest.mark.parametrize("n,k,c", SHAPES)
def test_loss_and_grads_match_float64(n, k, c, interp):
    case = make_case(n, k, c, interp)
    tol = tolerance(torch.float32, PRECISION)
    q = case.q_hat.clone().requires_grad_()
    kh = case.k_hat.clone().requires_grad_()
    loss, stats = it.info_nce_loss_triton(q, kh, case.queue, T, case.lam, case.perm, input_precision=PRECISION)
    assert stats is None  # no stats_bins: nothing binned, nothing returned
    loss.backward()
    ref_loss, _, ref_gq, ref_gk = reference(case)
    assert rel(loss.detach(), ref_loss) < tol.values
    assert rel(q.grad, ref_gq) < tol.grads
    assert rel(kh.grad, ref_gk) < tol.grads


@pytest.mark.parametrize("interp", [False, True], ids=["plain", "interp"])
@pytest.mark.parametrize("n,k,c", [(1, 100, 128), (7, 1000, 64), (64, 1000, 128), (64, 1, 64)])
@pytest.mark.parametrize("backward", ["fused", "recompute"])
def test_lse_rows_and_vjp(n, k, c, interp, backward):
    """Per row (a loss is a mean and could hide one bad row), with random upstream weights per row."""
    case = make_case(n, k, c, interp, seed=1)
    tol = tolerance(torch.float32, PRECISION)
    q = case.q_hat.clone().requires_grad_()
    lse, _ = it.neg_logsumexp(q, case.queue, T, case.lam, case.perm, backward=backward,
                              input_precision=PRECISION)
    w = torch.rand(n, generator=torch.Generator().manual_seed(5)).to(DEVICE) + 0.5
    (lse * w).sum().backward()

    q64 = case.q_hat.detach().double().requires_grad_()
    ref_lse = torch.logsumexp(ref.moco_logits(q64, q64, negatives(case), T)[:, 1:], dim=1)
    (ref_lse * w.double()).sum().backward()
    assert lse.shape == (n,) and lse.dtype == torch.float32
    assert rel(lse.detach(), ref_lse.detach()) < tol.values
    assert rel(q.grad, q64.grad) < tol.grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("interp", [False, True], ids=["plain", "interp"])
@pytest.mark.parametrize("n,k,c", [(7, 100, 64), (64, 1000, 128), (1, 1, 128)])
def test_16bit_queue(n, k, c, interp, dtype):
    case = make_case(n, k, c, interp, dtype)
    tol = tolerance(dtype)
    q = case.q_hat.clone().requires_grad_()
    kh = case.k_hat.clone().requires_grad_()
    loss, _ = it.info_nce_loss_triton(q, kh, case.queue, T, case.lam, case.perm)
    loss.backward()
    ref_loss, _, ref_gq, ref_gk = reference(case)
    assert rel(loss.detach(), ref_loss) < tol.values
    assert rel(q.grad, ref_gq) < tol.grads
    assert rel(kh.grad, ref_gk) < tol.grads


@pytest.mark.parametrize("k_per_split", [7, 64, 90, 5000])
def test_split_sizes_agree(k_per_split):
    """The K axis split over programs (tiles straddling split ends, splits shorter than a tile, one split)
    and the merge of their partial max / sum / gradient accumulators."""
    case = make_case(20, 300, 64, interp=True, seed=2)
    tol = tolerance(torch.float32, PRECISION)
    q = case.q_hat.clone().requires_grad_()
    lse, stats = it.neg_logsumexp(q, case.queue, T, case.lam, case.perm, stats_bins=(-0.3, 0.3, 20),
                                  k_per_split=k_per_split, input_precision=PRECISION)
    lse.sum().backward()
    q64 = case.q_hat.detach().double().requires_grad_()
    logits = ref.moco_logits(q64, q64, negatives(case), T)[:, 1:]
    torch.logsumexp(logits, dim=1).sum().backward()
    assert rel(lse.detach(), torch.logsumexp(logits.detach(), dim=1)) < tol.values
    assert rel(q.grad, q64.grad) < tol.grads
    assert int(stats.hist.sum()) == 20 * 300


def test_large_logits_are_stable():
    """|q_hat| ~ 40 at T 0.05: logits in the hundreds, exp would overflow fp32 without the running max."""
    case = make_case(16, 300, 64, interp=True, seed=3, scale=15.0)
    q = case.q_hat.clone().requires_grad_()
    lse, _ = it.neg_logsumexp(q, case.queue, 0.05, case.lam, case.perm, input_precision=PRECISION)
    lse.sum().backward()
    q64 = case.q_hat.detach().double().requires_grad_()
    ref_lse = torch.logsumexp(ref.moco_logits(q64, q64, negatives(case), 0.05)[:, 1:], 1)
    ref_lse.sum().backward()
    assert ref_lse.abs().max() > 100 and torch.isfinite(lse).all() and torch.isfinite(q.grad).all()
    assert rel(lse.detach(), ref_lse.detach()) < tolerance(torch.float32, PRECISION).values
    assert rel(q.grad, q64.grad) < tolerance(torch.float32, PRECISION).grads


def test_no_grad_and_non_contiguous_inputs():
    """Under no_grad the gradient accumulator is compiled out, lse is unchanged; strided inputs are fine."""
    case = make_case(7, 100, 64, interp=True, seed=4)
    with torch.no_grad():
        lse_ng, _ = it.neg_logsumexp(case.q_hat, case.queue, T, case.lam, case.perm, input_precision=PRECISION)
    q = case.q_hat.clone().requires_grad_()
    lse, _ = it.neg_logsumexp(q, case.queue, T, case.lam, case.perm, input_precision=PRECISION)
    assert not lse_ng.requires_grad and lse.requires_grad
    assert rel(lse_ng, lse.detach()) < (1e-6 if not ON_GPU else tolerance(torch.float32, PRECISION).values)
    # q_hat as a transposed view, the queue as every other column of a wider tensor.
    wide = torch.stack([case.queue, -case.queue], dim=2).reshape(100, 128)[:, ::2]
    assert not wide.is_contiguous() and torch.equal(wide, case.queue)
    strided_q = case.q_hat.t().contiguous().t()
    assert not strided_q.is_contiguous()
    lse_s, _ = it.neg_logsumexp(strided_q, wide, T, case.lam, case.perm, input_precision=PRECISION)
    assert torch.allclose(lse_s, lse.detach(), rtol=1e-6, atol=0)


def test_per_element_lambda_is_refused_and_a_0dim_tensor_is_a_scalar():
    """A per-element lam_n ([K, C]) is not fused: both entry points say so (the torch loss handles it, in
    fastft/loss.py); a 0-dim tensor lam_n is the same scalar as the float."""
    case = make_case(7, 100, 64, interp=True, seed=5)
    lam = torch.rand(100, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with pytest.raises(ValueError, match="per-element lam_n is not fused; use the torch loss"):
        it.info_nce_loss_triton(case.q_hat, case.k_hat, case.queue, T, lam, case.perm, stats_bins=(-0.5, 0.5, 10))
    with pytest.raises(ValueError, match="per-element lam_n is not fused; use the torch loss"):
        it.neg_logsumexp(case.q_hat, case.queue, T, lam[:1, :1], case.perm)
    as_float, _ = it.info_nce_loss_triton(case.q_hat, case.k_hat, case.queue, T, case.lam, case.perm)
    as_tensor, _ = it.info_nce_loss_triton(case.q_hat, case.k_hat, case.queue, T,
                                           torch.tensor(case.lam, device=DEVICE), case.perm)
    assert torch.equal(as_float, as_tensor)
    assert rel(as_tensor, reference(case)[0]) < tolerance(torch.float32, PRECISION).values


def test_recompute_backward_refuses_a_queue_modified_before_backward():
    """The recompute mode re-reads the queue in backward: an in-place write in between must not go unnoticed
    (MoCo's enqueue does exactly that, which is why MoCo uses the fused mode)."""
    case = make_case(7, 100, 64, interp=False, seed=6)
    queue = case.queue.clone()
    q = case.q_hat.clone().requires_grad_()
    lse, _ = it.neg_logsumexp(q, queue, T, backward="recompute")
    queue[:3] = 0.5
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lse.sum().backward()
    # The fused mode keeps no reference to the queue: the same write is harmless.
    q2 = case.q_hat.clone().requires_grad_()
    lse2, _ = it.neg_logsumexp(q2, queue, T)
    queue[3:6] = 0.25
    lse2.sum().backward()
    assert torch.isfinite(q2.grad).all()


def test_bad_inputs_are_reported():
    case = make_case(7, 100, 64, interp=True)
    with pytest.raises(ValueError, match=r"\[N, C\] and queue \[K, C\]"):
        it.neg_logsumexp(case.q_hat, case.queue[:, :32], T)
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        it.neg_logsumexp(case.q_hat, case.queue.double(), T)
    with pytest.raises(ValueError, match="permutation"):
        it.neg_logsumexp(case.q_hat, case.queue, T, 0.5, case.perm[:10])
    with pytest.raises(ValueError, match="perm given without lam_n"):
        it.neg_logsumexp(case.q_hat, case.queue, T, None, case.perm)
    with pytest.raises(ValueError, match="hi > lo"):
        it.neg_logsumexp(case.q_hat, case.queue, T, stats_bins=(0.5, -0.5, 10))


# --------------------------------------------------------------------------------------------------------------
# Negative-score statistics
# --------------------------------------------------------------------------------------------------------------

BINS = (-0.3, 0.25, 50)  # narrower than the scores (|s| reaches ~0.5): both end bins collect clamped scores


@pytest.mark.parametrize("interp", [False, True], ids=["plain", "interp"])
@pytest.mark.parametrize("n,k,c,dtype", [(1, 100, 64, torch.float32), (7, 1000, 128, torch.float32),
                                         (64, 1000, 64, torch.float32), (64, 1, 128, torch.float32),
                                         (33, 500, 128, torch.bfloat16)])
def test_neg_stats_match_reference(n, k, c, dtype, interp):
    case = make_case(n, k, c, interp, dtype, seed=7)
    tol = tolerance(dtype, PRECISION)
    q = case.q_hat.clone().requires_grad_()
    kh = case.k_hat.clone().requires_grad_()
    loss, stats = it.info_nce_loss_triton(q, kh, case.queue, T, case.lam, case.perm, stats_bins=BINS,
                                          input_precision=PRECISION)
    loss.backward()
    ref_loss, logits, ref_gq, _ = reference(case)
    s64 = logits[:, 1:] * T  # float64 scores q_hat . n_j
    expect = ref.neg_score_stats(s64, T, BINS)
    # Computing the statistics changes nothing else.
    assert rel(loss.detach(), ref_loss) < tol.values and rel(q.grad, ref_gq) < tol.grads

    assert stats.sum.shape == stats.sumsq.shape == stats.sumexp.shape == (n,)
    assert stats.sum.dtype == stats.sumsq.dtype == stats.sumexp.dtype == torch.float32
    # sum_j s_ij can be ~0 (scores of both signs): measure its error against the scale of its terms,
    # |q_hat_i| sum_j |n_j| (each |s_ij| is at most |q_hat_i| |n_j|).
    negs = negatives(case)
    scale = case.q_hat.double().norm(dim=1) * negs.norm(dim=1).sum()
    assert ((stats.sum.double() - s64.sum(1)).abs() / scale).max() < tol.stats
    assert rel(stats.sumsq, (s64 ** 2).sum(1)) < tol.stats
    assert ((stats.sumexp.double() / (s64 / T).exp().sum(1)) - 1).abs().max() < tol.stats
    assert rel(stats.sumexp, expect.sumexp) < tol.stats

    lo, hi, nbins = BINS
    assert stats.hist.dtype == torch.int64 and stats.hist.shape == (nbins,)
    assert int(stats.hist.sum()) == n * k
    t = (s64 - lo) * (nbins / (hi - lo))
    near_edge = ((t - t.round()).abs() * (hi - lo) / nbins < tol.edge).sum().item()
    assert near_edge <= max(2, 0.4 * n * k)  # the check below would be vacuous otherwise
    assert (stats.hist.cpu() - expect.hist.cpu()).abs().sum().item() <= 2 * near_edge
    if n * k >= 1000:  # clamping into the end bins is exercised
        assert expect.hist[0] > 0 and expect.hist[-1] > 0 and (s64 < lo).any() and (s64 >= hi).any()


@pytest.mark.skipif(not ON_GPU, reason="tf32 exists on the GPU only (the interpreter multiplies in fp32)")
@pytest.mark.parametrize("interp", [False, True], ids=["plain", "interp"])
@pytest.mark.parametrize("n,k,c", [(7, 1000, 128), (64, 1000, 64), (256, 65536, 128)])
def test_tf32_on_gpu(n, k, c, interp):
    case = make_case(n, k, c, interp, seed=8)
    tol = tolerance(torch.float32, "tf32")
    q = case.q_hat.clone().requires_grad_()
    kh = case.k_hat.clone().requires_grad_()
    loss, stats = it.info_nce_loss_triton(q, kh, case.queue, T, case.lam, case.perm, stats_bins=BINS,
                                          input_precision="tf32")
    loss.backward()
    ref_loss, logits, ref_gq, ref_gk = reference(case)
    assert rel(loss.detach(), ref_loss) < tol.values
    assert rel(q.grad, ref_gq) < tol.grads and rel(kh.grad, ref_gk) < tol.grads
    assert rel(stats.sumsq, ((logits[:, 1:] * T) ** 2).sum(1)) < tol.stats
    assert int(stats.hist.sum()) == n * k


# The driver and the kernel tests never run in the same process: drop whichever does not belong here, so that
# a CPU run shows one test (not dozens of skips) and the child does not start another child.
for _name in [n for n in list(globals()) if n.startswith("test_")]:
    if (_name == "test_kernels_under_the_interpreter") == RUN_HERE:
        del globals()[_name]
