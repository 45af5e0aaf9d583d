"""The loss interface (fastft/loss.py): torch and fused Triton losses give one result type, the same numbers, and
MoCo + the trainer run on either. The Triton side runs under the interpreter in a child process (the kernels'
compiled-or-interpreted mode is fixed at import), as tests/test_kernel_triton.py does."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import run_under_interpreter, tiny_overrides
from fastft.config import ConfigError, FTConfig, ModelConfig, load_config
from fastft.feature_transform import FeatureTransform, NegativeMix
from fastft.kernels import moco_logits
from fastft.loss import TorchInfoNCE, TritonInfoNCE, select_loss
from fastft.metrics import read_metrics
from fastft.moco import MoCo

T = 0.2
BINS = (-3.0, 3.0, 24)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def features(n: int, k: int, c: int, seed: int, pos: str = "extrapolate", dim_mask: str = "none"):
    g = torch.Generator().manual_seed(seed)
    q, key, queue = (F.normalize(torch.randn(*s, generator=g), dim=1) for s in ((n, c), (n, c), (k, c)))
    ft = FeatureTransform(FTConfig(pos=pos, dim_mask=dim_mask), seed=seed)
    draw = ft.draw(n, queue, 0)
    q = q.requires_grad_()
    q_hat, k_hat = ft.positives(q, key, draw)
    return q, q_hat, k_hat, queue, draw


def test_the_mix_is_the_papers_formula_and_leaves_the_queue_alone():
    g = torch.Generator().manual_seed(0)
    queue = torch.randn(9, 4, generator=g)
    perm = torch.randperm(9, generator=g)
    before = queue.clone()
    mixed = NegativeMix(0.3, perm).apply(queue)
    for j in range(9):
        torch.testing.assert_close(mixed[j], 0.3 * before[j] + 0.7 * before[perm[j]])
    assert torch.equal(queue, before)


@pytest.mark.parametrize("n,k,c", [(5, 17, 8), (12, 64, 16)])
def test_torch_loss_output(n, k, c):
    q, q_hat, k_hat, queue, draw = features(n, k, c, seed=n)
    out = TorchInfoNCE()(q_hat, k_hat, queue, T, draw.mix, BINS)
    logits = moco_logits(q_hat, k_hat, draw.mix.apply(queue), T)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, torch.zeros(n, dtype=torch.long)))
    torch.testing.assert_close(out.pos, (q_hat * k_hat).sum(1).detach())
    s = logits[:, 1:].detach() * T
    torch.testing.assert_close(out.neg.sum, s.sum(1))
    torch.testing.assert_close(out.neg.sumsq, (s * s).sum(1))
    assert int(out.neg.hist.sum()) == n * k and not out.pos.requires_grad
    assert TorchInfoNCE()(q_hat, k_hat, queue, T, draw.mix).neg is None  # no bins: no statistics


def test_select_loss_on_the_cpu():
    cpu = torch.device("cpu")
    assert isinstance(select_loss("torch", cpu), TorchInfoNCE)
    assert isinstance(select_loss("auto", cpu), TorchInfoNCE)
    # loss.tf32: the fused kernel's dot products on TF32 tensor cores, or in full fp32 as the authors compute.
    assert TritonInfoNCE().input_precision == "tf32" and TritonInfoNCE(tf32=False).input_precision == "ieee"
    assert load_config(None).loss.tf32 and not load_config(None, ["loss.tf32=false"]).loss.tf32
    with pytest.raises(ConfigError, match="valid choices"):
        select_loss("cuda", cpu)


COMPILED_ON_CPU = """
import torch
from fastft.config import ConfigError
from fastft.loss import select_loss
try:
    select_loss("triton", torch.device("cpu"))
except ConfigError as e:
    print("select:", e)
from fastft.kernels import neg_logsumexp
try:
    neg_logsumexp(torch.randn(4, 64), torch.randn(10, 64), 0.2)
except RuntimeError as e:
    print("call:", e)
"""


def test_triton_on_cpu_without_interpreter_says_how():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILED_ON_CPU], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all("TRITON_INTERPRET=1" in line for line in lines), out.stdout
    assert lines[0].startswith("select:") and lines[1].startswith("call:")


def test_the_interpreted_fused_tests_pass():
    """The tests below that need Triton, in a child process with the interpreter on."""
    run_under_interpreter(__file__, min_passed=4)  # the child really ran the suite


@pytest.mark.parametrize("pos,dim_mask", [("extrapolate", "none"), ("none", "none"), ("extrapolate", "both")])
def test_fused_and_torch_give_the_same_output_and_gradient(pos, dim_mask):
    q, q_hat, k_hat, queue, draw = features(7, 100, 64, seed=3, pos=pos, dim_mask=dim_mask)
    outs, grads = [], []
    for loss in (TorchInfoNCE(), select_loss("triton", torch.device("cpu"))):
        out = loss(q_hat, k_hat, queue, T, draw.mix, BINS)
        (g,) = torch.autograd.grad(out.loss, q, retain_graph=True)
        outs.append(out)
        grads.append(g)
    a, b = outs
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.pos, b.pos)
    for x, y in zip(a.neg[:3], b.neg[:3]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    assert int(b.neg.hist.sum()) == 700 and (a.neg.hist - b.neg.hist).abs().sum() <= 2


def test_fused_moco_step_with_a_bf16_queue_matches_the_torch_loss():
    """MoCo stores the queue in loss.queue_dtype; the fused loss matches the torch loss on the same step, and
    enqueued keys are rounded into the bf16 queue the same way on both."""
    torch.manual_seed(0)
    # One batch-norm group: split BN's groups depend on a permutation each model draws anew, and the two models
    # must encode the same keys (batch norm over the whole batch does not depend on the order).
    cfg = ModelConfig(arch="resnet18", small_stem=True, dim=64, queue_size=40, momentum=0.9, bn_splits=1)
    fused = MoCo(cfg, FTConfig(), TritonInfoNCE(), queue_dtype=torch.bfloat16)
    plain = copy.deepcopy(fused)
    plain.loss = TorchInfoNCE()
    assert fused.queue.dtype == torch.bfloat16
    views = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = {}
    for name, model in (("fused", fused), ("plain", plain)):
        out[name] = model(views[0], views[1], stats_bins=BINS)
        out[name].loss.backward()
        model.enqueue(out[name].k)
    f, p = out["fused"], out["plain"]
    assert f.draw.mix is not None and f.neg is not None
    torch.testing.assert_close(f.loss.detach(), p.loss.detach(), rtol=2e-2, atol=1e-3)
    assert all(q.grad is not None for q in fused.encoder_q.parameters())
    assert fused.queue.dtype == torch.bfloat16 and torch.equal(fused.queue, plain.queue)
    assert int(fused.queue_ptr) == 16


def test_fused_training_matches_torch(tmp_path, data_cache, monkeypatch):
    """The same few steps with loss.kernel torch and triton (interpreted): the same loss curve, and the fused
    path (with its in-kernel score statistics) really ran."""
    from fastft.kernels import infonce_triton as it
    from fastft.trainer import train

    calls = []
    real_forward = it._forward
    monkeypatch.setattr(it, "_forward", lambda *a, **kw: calls.append((a, kw)) or real_forward(*a, **kw))

    def curve(kernel: str) -> list[float]:
        out = tmp_path / kernel
        overrides = {"loss.kernel": kernel, "model.dim": 64, "optim.epochs": 1}  # 3 steps: ~10 s on 2 cores
        train(load_config(None, tiny_overrides(out, data_cache, **overrides)))
        return [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]

    torch_curve = curve("torch")
    assert not calls
    triton_curve = curve("triton")
    assert len(calls) == len(triton_curve) == len(torch_curve) == 3
    assert all(a[4] is not None and kw["with_grad"] for a, kw in calls)  # stats binned in the same pass
    assert triton_curve == pytest.approx(torch_curve, rel=1e-4)
    assert len(set(torch_curve)) == 3  # the curve moves: equal curves are not equal constants


# The interpreted tests (test_fused_*) run only in the driver's child, which runs nothing else: each process
# keeps its own tests (no skips shown), and the child does not start another child.
for _name in [n for n in list(globals()) if n.startswith("test_")]:
    if _name.startswith("test_fused_") != INTERPRETED:
        del globals()[_name]
