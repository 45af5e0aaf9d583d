"""Feature Transformation against a direct hand computation of the formulas in docs/design.md, section 1."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastft.config import FTConfig, ModelConfig
from fastft.feature_transform import FeatureTransform, NegativeMix, transform_positives
from fastft.kernels import info_nce_loss, moco_logits
from fastft.moco import MoCo


def unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def hand_logits(q, k, queue, T, lam_p, lam_n, perm):
    """Row by row, element by element, in numpy float64: no code shared with the implementation."""
    q, k, queue = q.numpy(), k.numpy(), queue.numpy()
    n, kq = q.shape[0], queue.shape[0]
    out = np.zeros((n, 1 + kq))
    for i in range(n):
        q_hat = lam_p * q[i] + (1 - lam_p) * k[i]
        k_hat = lam_p * k[i] + (1 - lam_p) * q[i]  # the original q
        out[i, 0] = sum(a * b for a, b in zip(q_hat, k_hat)) / T
        for j in range(kq):
            neg = lam_n * queue[j] + (1 - lam_n) * queue[perm[j]]
            out[i, 1 + j] = float(np.dot(q_hat, neg)) / T
    return out


@pytest.mark.parametrize("n,kq,c", [(1, 5, 4), (6, 13, 8), (9, 32, 16)])
def test_logits_equal_hand_computation(n, kq, c):
    g = torch.Generator().manual_seed(n * 100 + kq)
    q, k, queue = unit(n, c, gen=g), unit(n, c, gen=g), unit(kq, c, gen=g)
    lam_p, lam_n, T = 1.37, 0.61, 0.07
    perm = torch.randperm(kq, generator=g)
    q_hat, k_hat = transform_positives(q, k, lam_p)
    got = moco_logits(q_hat, k_hat, NegativeMix(lam_n, perm).apply(queue), T)
    np.testing.assert_allclose(got.numpy(), hand_logits(q, k, queue, T, lam_p, lam_n, perm.numpy()), rtol=1e-12)
    # No re-normalisation: q_hat has norm >= 1 under extrapolation, mixed negatives norm <= 1.
    assert (q_hat.norm(dim=1) >= 1 - 1e-12).all()


def test_plain_moco_logits_without_ft():
    g = torch.Generator().manual_seed(0)
    q, k, queue = unit(4, 8, gen=g), unit(4, 8, gen=g), unit(10, 8, gen=g)
    got = moco_logits(q, k, queue, 0.2)
    want = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / 0.2
    torch.testing.assert_close(got, want)


def test_gradient_reaches_q_through_both_q_hat_and_k_hat():
    g = torch.Generator().manual_seed(1)
    q0, k, queue = unit(5, 8, gen=g), unit(5, 8, gen=g), unit(20, 8, gen=g)
    perm = torch.randperm(20, generator=g)

    def grad(through_q_hat: bool, through_k_hat: bool) -> torch.Tensor:
        q = q0.clone().requires_grad_(True)
        q_hat, _ = transform_positives(q if through_q_hat else q.detach(), k, 1.6)
        _, k_hat = transform_positives(q if through_k_hat else q.detach(), k, 1.6)
        loss, _ = info_nce_loss(q_hat, k_hat, NegativeMix(0.3, perm).apply(queue), 0.2)
        loss.backward()
        return q.grad if q.grad is not None else torch.zeros_like(q)

    full, via_q_hat, via_k_hat = grad(True, True), grad(True, False), grad(False, True)
    assert via_k_hat.abs().max() > 1e-3 and via_q_hat.abs().max() > 1e-3
    torch.testing.assert_close(full, via_q_hat + via_k_hat)


def tiny_moco(ft: FTConfig, K: int = 10) -> MoCo:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="resnet18", small_stem=True, head="mlp", dim=16, queue_size=K, momentum=0.9,
                      temperature=0.2, bn_splits=1)  # batches of 3 or 4: one batch-norm group (split BN is its own test)
    return MoCo(cfg, ft)


def capture_keys(model: MoCo) -> list:
    keys = []
    model.encoder_k.register_forward_hook(lambda m, i, o: keys.append(F.normalize(o.detach(), dim=1)))
    return keys


def test_key_encoder_gets_no_gradient_and_queue_gets_clean_keys():
    model = tiny_moco(FTConfig())  # defaults: extrapolation + interpolation
    keys = capture_keys(model)
    seen = {}
    model.loss.register_forward_hook(lambda m, args, out: seen.update(queue_arg=args[2].clone(), mix=args[4]))
    before = model.queue.clone()
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    out = model(x1, x2, stats_bins=(-3.0, 3.0, 30))
    out.loss.backward()
    assert torch.equal(model.queue, before)  # forward leaves the queue alone: enqueue is the trainer's call
    model.enqueue(out.k)

    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())
    assert torch.equal(seen["queue_arg"], before)  # the loss was handed the stored queue, not a mix of it
    draw = out.draw
    assert seen["mix"] is draw.mix
    assert 0.0 <= draw.mix.lam <= 1.0 and 1.0 <= draw.lam_p <= 2.0
    assert sorted(draw.mix.perm.tolist()) == list(range(10))
    # The scores were taken against the mixed negatives of the pre-step queue ...
    with torch.no_grad():
        q = F.normalize(model.encoder_q(x1), dim=1)  # no optimizer step yet: same query features
    torch.testing.assert_close(out.q, q)
    q_hat = draw.lam_p * q + (1 - draw.lam_p) * keys[0]
    k_hat = draw.lam_p * keys[0] + (1 - draw.lam_p) * q
    neg = draw.mix.lam * before + (1 - draw.mix.lam) * before[draw.mix.perm]
    s = q_hat @ neg.t()
    torch.testing.assert_close(out.pos, (q_hat * k_hat).sum(1))
    torch.testing.assert_close(out.neg.sum, s.sum(1))
    torch.testing.assert_close(out.neg.sumexp, (s / 0.2).exp().sum(1))
    assert int(out.neg.hist.sum()) == 4 * 10
    # ... and after enqueue the queue holds exactly the clean keys at rows 0..3, everything else untouched.
    torch.testing.assert_close(model.queue[:4], keys[0])
    assert torch.equal(model.queue[4:], before[4:])
    assert int(model.queue_ptr) == 4


def test_enqueue_before_backward_is_refused_by_autograd_not_silently_wrong():
    model = tiny_moco(FTConfig(pos="none", neg="none"))
    out = model(torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8))
    model.enqueue(out.k)  # the torch loss kept the queue for backward: this is the wrong order
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_enqueue_wraps_around_K():
    model = tiny_moco(FTConfig(pos="none", neg="none"), K=10)
    before = model.queue.clone()
    model.queue_ptr.fill_(7)
    keys = F.normalize(torch.randn(5, 16), dim=1)
    model.enqueue(keys)
    torch.testing.assert_close(model.queue[[7, 8, 9, 0, 1]], keys)
    assert torch.equal(model.queue[2:7], before[2:7])
    assert int(model.queue_ptr) == 2
    many = F.normalize(torch.randn(13, 16), dim=1)  # more keys than slots: the newest K remain, in ring order
    model.enqueue(many)
    assert int(model.queue_ptr) == (2 + 13) % 10
    for j in range(13 - 10, 13):
        torch.testing.assert_close(model.queue[(2 + j) % 10], many[j])


def test_plain_moco_baseline_trains_a_step():
    model = tiny_moco(FTConfig(pos="none", neg="none"))
    keys = capture_keys(model)
    before = model.queue.clone()
    out = model(torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8))
    out.loss.backward()
    model.enqueue(out.k)
    assert out.draw.lam_p is None and out.draw.mix is None and not out.draw.transformed
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(model.queue[:3], keys[0])
    assert torch.equal(model.queue[3:], before[3:])


def test_draws_follow_the_configured_distributions():
    torch.manual_seed(0)
    queue = torch.randn(7, 4)
    ft = FeatureTransform(FTConfig())
    draws = [ft.draw(3, queue, epoch=0) for _ in range(3000)]
    lam_p = np.array([d.lam_p for d in draws])
    lam_n = np.array([d.mix.lam for d in draws])
    assert lam_p.min() >= 1 and lam_p.max() <= 2 and lam_n.min() >= 0 and lam_n.max() <= 1
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)): 0.05 for a 2.0, ~0.0595 for a 1.6.
    assert abs(lam_p.mean() - 1.5) < 0.02 and abs(lam_p.var() - 0.05) < 0.006
    assert abs(lam_n.mean() - 0.5) < 0.02 and abs(lam_n.var() - 1 / (4 * 4.2)) < 0.006
    inter = FeatureTransform(FTConfig(pos="interpolate", neg="none")).draw(3, queue, 0)
    assert 0 <= inter.lam_p <= 1 and inter.mix is None


def test_per_element_masks_and_start_epoch():
    queue = torch.randn(11, 6)
    d = FeatureTransform(FTConfig(dim_mask="both")).draw(4, queue, epoch=0)
    assert d.lam_p.shape == (4, 6) and d.mix.lam.shape == (11, 6) and not d.mix.scalar
    assert ((d.lam_p >= 1) & (d.lam_p <= 2)).all()
    # The authors' one-sided variants (--dim_mask pos / neg): per element on one side, a scalar on the other.
    pos_only = FeatureTransform(FTConfig(dim_mask="pos")).draw(4, queue, epoch=0)
    assert pos_only.lam_p.shape == (4, 6) and isinstance(pos_only.mix.lam, float) and pos_only.mix.scalar
    neg_only = FeatureTransform(FTConfig(dim_mask="neg")).draw(4, queue, epoch=0)
    assert isinstance(neg_only.lam_p, float) and neg_only.mix.lam.shape == (11, 6)
    late = FeatureTransform(FTConfig(start_epoch=3))
    assert late.draw(4, queue, epoch=2).lam_p is None and late.draw(4, queue, epoch=3).lam_p is not None


def test_postmix_norm_renormalises():
    g = torch.Generator().manual_seed(2)
    q, k = unit(5, 8, gen=g), unit(5, 8, gen=g)
    q_hat, k_hat = transform_positives(q, k, 1.8, renorm=True)
    torch.testing.assert_close(q_hat.norm(dim=1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(k_hat.norm(dim=1), torch.ones(5, dtype=torch.float64))


def test_neg_score_stats_match_numpy():
    from fastft.kernels import neg_score_stats
    g = torch.Generator().manual_seed(3)
    s = torch.rand(5, 40, generator=g) * 3 - 1.5  # some outside [-1, 1): clamped into the end bins
    st = neg_score_stats(s, 0.2, (-1.0, 1.0, 8))
    x = s.double().numpy()
    np.testing.assert_allclose(st.sum.numpy(), x.sum(1), rtol=1e-5)
    np.testing.assert_allclose(st.sumsq.numpy(), (x ** 2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(st.sumexp.numpy(), np.exp(x / 0.2).sum(1), rtol=1e-5)
    want, _ = np.histogram(np.clip(x, -1, 1 - 1e-9), bins=8, range=(-1, 1))
    np.testing.assert_array_equal(st.hist.numpy(), want)
