"""The demo's recipe (configs/demo.yaml, what `make demo` runs: MoCo v2 + full Feature Transformation on the
built-in scenes), trained once as `make demo` trains it, then probed: it learns (it beats the same network at
random initialisation and the raw pixels, by margins the three measured seeds allow), it does not collapse, and
its probe converges and agrees with a closed-form cross-check.

About six minutes on 2 CPU cores: the one test of the suite that trains a whole recipe.
"""
import pytest

from fastft import checkpoint as ckpt_io
from fastft import linear
from fastft.config import load_config
from fastft.metrics import read_metrics, run_results
from fastft.pretrained import load_backbone, random_backbone
from fastft.score_stats import COLLAPSED_NEG_VAR, read_scores
from fastft.trainer import train

# Issue 13's bar: trained - random init >= 10 points of kNN and >= 5 of linear top-1, trained - pixels >= 10 of
# kNN. Measured with split batch norm in 2 groups (configs/demo.yaml, seed 0, 2026-12-08): +24.6, +11.0 and +19.7
# (with plain batch norm over seeds 0-2: +29.9 to +31.4, +8.0 to +8.7, +23.9 to +26.1; README, "Zero to a result").
KNN_OVER_INIT, LINEAR_OVER_INIT, KNN_OVER_PIXELS = 0.10, 0.05, 0.10


@pytest.fixture(scope="module")
def demo(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("demo")
    cfg = load_config("demo", [f"data.cache_dir={data_cache}", f"run.out_dir={out}", "run.progress=false",
                               "run.tensorboard=false"])
    train(cfg)
    probes = {"trained": linear.LinearProbe(cfg, load_backbone(ckpt_io.list_checkpoints(out)[0], cfg.model)),
              "random init": linear.LinearProbe(cfg, random_backbone(cfg.model, cfg.run.seed))}
    return cfg, out, probes, {name: p.run() for name, p in probes.items()}


def test_the_demo_learns_what_random_init_and_pixels_do_not(demo):
    cfg, out, _, probed = demo
    knn = run_results(out, read_metrics(out))
    lin = {name: r.top1 for name, r in probed.items()}
    print(f"kNN {knn}, linear {lin}")
    assert cfg.ft.pos == "extrapolate" and cfg.ft.neg == "interpolate"  # the paper's full FT
    assert knn["kNN"] - knn["kNN random init"] >= KNN_OVER_INIT
    assert knn["kNN"] - knn["kNN pixels"] >= KNN_OVER_PIXELS
    assert lin["trained"] - lin["random init"] >= LINEAR_OVER_INIT


def test_the_demo_does_not_collapse(demo):
    """The untransformed negative scores keep their variance through the last epoch (a collapsed projection, every
    key pointing one way, leaves them less than COLLAPSED_NEG_VAR: docs/collapse.md)."""
    _, out, _, _ = demo
    s = read_scores(out)
    last = s.epochs == s.epochs.max()
    var = s.series["raw_neg_var"][last].mean()
    assert var > 10 * COLLAPSED_NEG_VAR, var
    assert s.series["raw_neg_var"][last].min() > COLLAPSED_NEG_VAR


def test_the_demo_probe_converges_and_agrees_with_the_cross_check(demo):
    """For the trained and the random-init encoder the probe's last-epoch training loss is within 2x of its
    lowest, and the trained-vs-random gap is within 3 points of the gap an L-BFGS logistic regression finds on
    the same cached features."""
    _, _, probes, probed = demo
    top1, cross = {}, {}
    for name, p in probes.items():
        res = probed[name]
        assert res.train_loss == p.history[-1] and p.history[-1] <= 2 * min(p.history), (name, p.history)
        assert linear.converged(res.train_loss, 17)
        top1[name] = res.top1
        cross[name] = linear.logistic_regression(*p.cached_features())[0]
    print(f"probe top-1 {top1}, logistic regression {cross}")
    gap, cross_gap = top1["trained"] - top1["random init"], cross["trained"] - cross["random init"]
    assert abs(gap - cross_gap) <= 0.03, (top1, cross)
