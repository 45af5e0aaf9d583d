"""Score statistics: equal to numpy on the same logits (after FT), no host sync, files, resume, and FT's effects."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides
from fastft.config import ConfigError, FTConfig, ScoresConfig, load_config
from fastft.feature_transform import FeatureTransform, NegativeMix
from fastft.kernels import NegStats, histogram, moco_logits, neg_score_stats
from fastft.loss import TorchInfoNCE
from fastft.moco import MoCoStep
from fastft.score_stats import SERIES, BinSpec, ScoreRecorder, ScoreStore, read_scores
from fastft.trainer import train

T = 0.2
BINS = dict(bins=64, pos_lo=-4.0, pos_hi=1.0, neg_lo=-3.0, neg_hi=3.0)


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=1)


def np_hist(x: np.ndarray, lo: float, hi: float, n: int) -> np.ndarray:
    """An independent histogram: numpy's bins, with outliers moved into the end bins."""
    return np.histogram(np.clip(x, lo, np.nextafter(hi, lo)), bins=np.linspace(lo, hi, n + 1))[0]


def np_expected(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """The authors' five numbers per sample (plus the two squares), averaged over the batch, in float64 (the
    variance unbiased, as their torch.var)."""
    return {"pos_mean": pos.mean(), "pos_sq_mean": (pos ** 2).mean(), "neg_mean": neg.mean(1).mean(),
            "neg_sq_mean": (neg ** 2).mean(1).mean(), "neg_var": neg.var(1, ddof=1).mean(),
            "exp_neg_mean": np.exp(neg / T).mean(1).mean(), "exp_pos_mean": np.exp(pos / T).mean()}


def assert_hist_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.sum() == want.sum()
    assert np.abs(got - want).sum() <= 2  # a score on a bin edge may round to either side (fp32 vs fp64)


def ft_step(n=12, k=50, c=16, pos="extrapolate", neg="interpolate"):
    """One step's FT and torch loss on random features: (MoCoStep, the stored queue, the loss's logits)."""
    q, kk, queue = unit(n, c), unit(n, c), unit(k, c)
    ft = FeatureTransform(FTConfig(pos=pos, neg=neg))
    draw = ft.draw(n, queue, 0)
    q_hat, k_hat = ft.positives(q, kk, draw)
    out = TorchInfoNCE()(q_hat, k_hat, queue, T, draw.mix, (BINS["neg_lo"], BINS["neg_hi"], BINS["bins"]))
    negatives = queue if draw.mix is None else draw.mix.apply(queue)
    return MoCoStep(out.loss, out.pos, out.neg, q, kk, draw), queue, moco_logits(q_hat, k_hat, negatives, T)


def recorder(tmp_path, **cfg) -> ScoreRecorder:
    rec = ScoreRecorder(ScoresConfig(**{**BINS, **cfg}), T, torch.device("cpu"), ScoreStore(tmp_path))
    rec.begin(0, None)
    return rec


def test_statistics_equal_numpy_on_the_same_logits_after_ft(tmp_path):
    torch.manual_seed(0)
    rec = recorder(tmp_path, flush_every=10)
    steps = []
    for step in (1, 2, 3):
        out, queue, logits = ft_step()
        q, k, draw = out.q, out.k, out.draw
        assert draw.lam_p is not None and draw.mix is not None and draw.lam_p > 1  # FT really ran
        rec.observe(out, queue)
        rec.commit(step, 0)
        scores = logits.numpy().astype(np.float64) * T  # the same logits, undone by T
        raw_neg = q.numpy().astype(np.float64) @ queue.numpy().astype(np.float64).T
        steps.append((scores[:, 0], scores[:, 1:], (q * k).sum(1).numpy().astype(np.float64), raw_neg))
    rec.flush()
    got = read_scores(tmp_path)
    assert got.steps.tolist() == [1, 2, 3] and got.chunk_last.tolist() == [3]
    for i, (pos, neg, raw_pos, raw_neg) in enumerate(steps):
        for feat, (p, n) in (("ft", (pos, neg)), ("raw", (raw_pos, raw_neg))):
            for name, want in np_expected(p, n).items():
                assert got.series[f"{feat}_{name}"][i] == pytest.approx(want, rel=1e-5, abs=1e-6), (feat, name, i)
    for feat, p, n in (("ft", 0, 1), ("raw", 2, 3)):
        assert_hist_close(got.hists[f"{feat}_pos"][0], sum(np_hist(s[p], -4, 1, 64) for s in steps))
        assert_hist_close(got.hists[f"{feat}_neg"][0], sum(np_hist(s[n].ravel(), -3, 3, 64) for s in steps))
    # Extrapolated positives fall below -1 (a cosine could not): the bins are wide enough to show it.
    assert min(s[0].min() for s in steps) < -1 and got.hists["ft_pos"][0][0] < got.hists["ft_pos"][0].sum()


def test_per_sample_rows_are_the_authors_five_numbers_and_rebuild_the_batch_means(tmp_path):
    """Rows stored as the authors log them (fp16 for the first three): each equals numpy on the same logits, and
    the batch means recomputed from them equal the logged means within fp16 tolerance."""
    from fastft.score_stats import SAMPLE_SERIES
    torch.manual_seed(4)
    rec = recorder(tmp_path, flush_every=10, samples=12)
    want = []
    for step in (1, 2):
        out, queue, logits = ft_step(n=12)
        rec.observe(out, queue)
        rec.commit(step, 3)
        sc = logits.numpy().astype(np.float64) * T
        pos, neg = sc[:, 0], sc[:, 1:]
        want.append(np.stack([neg.mean(1), neg.var(1, ddof=1), pos, np.exp(neg / T).mean(1), np.exp(pos / T)], 1))
    rec.flush()
    got = read_scores(tmp_path)
    rows, idx = got.samples["ft"], got.sample_index
    assert rows.shape == (24, len(SAMPLE_SERIES)) and not np.isnan(got.samples["raw"]).any()
    assert idx["step"].tolist() == [1] * 12 + [2] * 12 and set(idx["epoch"]) == {3} and set(idx["rank"]) == {0}
    assert idx["sample"].tolist() == list(range(12)) * 2
    np.testing.assert_allclose(rows, np.concatenate(want), rtol=2e-3, atol=2e-3)  # fp16: 11 bits of mantissa
    assert not np.array_equal(rows[:, :3], np.concatenate(want)[:, :3].astype(np.float32))  # really rounded
    for i, step in enumerate((1, 2)):
        mine = rows[idx["step"] == step].mean(0)
        for col, name in (("neg_mean", "neg_mean"), ("neg_var", "neg_var"), ("pos", "pos_mean"),
                          ("exp_neg", "exp_neg_mean"), ("exp_pos", "exp_pos_mean")):
            assert mine[SAMPLE_SERIES.index(col)] == pytest.approx(got.series[f"ft_{name}"][i], rel=2e-3, abs=2e-3)


def test_per_sample_rows_keep_the_first_samples_of_each_batch(tmp_path):
    torch.manual_seed(5)
    rec = recorder(tmp_path, flush_every=10, samples=5)
    out, queue, logits = ft_step(n=12)
    rec.observe(out, queue)
    rec.commit(1, 0)
    short, queue2, _ = ft_step(n=3)  # a last, short batch: its missing rows are not invented
    rec.observe(short, queue2)
    rec.commit(2, 0)
    rec.flush()
    got = read_scores(tmp_path)
    assert got.sample_index["sample"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    np.testing.assert_allclose(got.samples["ft"][:5, 2], (logits[:5, 0] * T).numpy(), rtol=2e-3, atol=2e-3)


def test_histogram_matches_numpy_and_neg_stats_use_it():
    torch.manual_seed(1)
    s = torch.randn(7, 300) * 1.5  # some beyond [-3, 3): they must land in the end bins
    got = neg_score_stats(s, T, (-3.0, 3.0, 40))
    assert got.hist.dtype == torch.int64
    np.testing.assert_array_equal(got.hist.numpy(), np_hist(s.double().numpy().ravel(), -3.0, 3.0, 40))
    assert torch.equal(histogram(s[0], (-3.0, 3.0, 40)), neg_score_stats(s[:1], T, (-3.0, 3.0, 40)).hist)


def test_fused_style_output_records_what_the_torch_loss_records(tmp_path):
    """The fused kernel's path (pos from q_hat . k_hat, NegStats from its own pass) records the same numbers."""
    torch.manual_seed(2)
    out, queue, logits = ft_step()
    a, b = recorder(tmp_path / "a"), recorder(tmp_path / "b")
    a.observe(out, queue)
    s = logits.detach() * T
    fused = MoCoStep(out.loss, s[:, 0].clone(), NegStats(*neg_score_stats(s[:, 1:], T, a.neg_bins.as_tuple())),
                     out.q, out.k, out.draw)
    b.observe(fused, queue)
    torch.testing.assert_close(a.means[0], b.means[0])
    assert torch.equal(a.hists, b.hists)


def test_no_host_sync_between_flushes(tmp_path, monkeypatch):
    """observe/commit must not read anything back from the device (each read is a sync on CUDA)."""
    torch.manual_seed(3)
    batches = [ft_step() for _ in range(3)]
    rec = recorder(tmp_path, flush_every=4)

    def forbidden(*a, **kw):
        raise AssertionError("host sync in the per-step path")
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "bincount", forbidden)  # reads min/max back on CUDA
    for step, (out, queue, _) in enumerate(batches, 1):
        rec.observe(out, queue)
        rec.commit(step, 0)
    monkeypatch.undo()
    assert not (tmp_path / "scores" / "chunk_0000000001.npz").exists()  # nothing flushed yet
    rec.flush()
    assert read_scores(tmp_path).steps.tolist() == [1, 2, 3]


def test_the_trainers_step_records_the_loss_scores_and_the_clean_features(tmp_path, data_cache):
    """Through the trainer's step: FT stats equal numpy on the logits the loss built; untransformed ones equal
    numpy on the clean q, k and the queue as it was before this step's enqueue."""
    from fastft.trainer import Trainer
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache, **{"model.queue_size": 64}))
    trainer = Trainer(cfg)
    trainer.prepare()
    seen = {}
    trainer.model.loss.register_forward_hook(lambda m, args, out: seen.update(
        logits=moco_logits(args[0], args[1], args[2] if args[4] is None else args[4].apply(args[2]), args[3]),
        queue=args[2].clone()))
    positives = trainer.model.ft.positives
    trainer.model.ft.positives = lambda q, k, draw: (seen.update(q=q.detach().clone(), k=k.clone()),
                                                     positives(q, k, draw))[1]
    queue_before = trainer.model.queue.clone()
    torch.manual_seed(4)
    x1, x2 = torch.rand(16, 3, 8, 8), torch.rand(16, 3, 8, 8)
    trainer.train_step(x1, x2)
    assert torch.equal(seen["queue"], queue_before)
    assert not torch.equal(trainer.model.queue, queue_before)  # enqueue ran after the stats were taken
    trainer.scores.commit(1, 0)
    trainer.scores.flush()
    got = read_scores(tmp_path)
    s = seen["logits"].detach().numpy().astype(np.float64) * cfg.model.temperature
    q, k, qu = (t.numpy().astype(np.float64) for t in (seen["q"], seen["k"], queue_before))
    for feat, (p, n) in (("ft", (s[:, 0], s[:, 1:])), ("raw", ((q * k).sum(1), q @ qu.T))):
        for name, want in np_expected(p, n).items():
            assert got.series[f"{feat}_{name}"][0] == pytest.approx(want, rel=1e-5, abs=1e-6), (feat, name)
    assert got.series["ft_pos_mean"][0] < got.series["raw_pos_mean"][0]  # extrapolation made positives harder


def run(tmp_path, name, cache, **extra):
    out = tmp_path / name
    train(load_config(None, tiny_overrides(out, cache, **extra)))
    return read_scores(out)


def test_ft_effects_at_the_same_step_on_the_same_batch(tmp_path, data_cache):
    """Same seed, model and first batch: extrapolation lowers the logged pos scores, interpolation the neg
    variance (the two effects the paper shows); the untransformed scores prove it is the same batch and model."""
    short = {"optim.epochs": 1, "run.steps_per_epoch": 1, "model.queue_size": 512}
    plain = run(tmp_path, "plain", data_cache, **short, **{"ft.pos": "none", "ft.neg": "none"})
    pos = run(tmp_path, "pos", data_cache, **short, **{"ft.pos": "extrapolate", "ft.neg": "none"})
    neg = run(tmp_path, "neg", data_cache, **short, **{"ft.pos": "none", "ft.neg": "interpolate"})
    for r in (plain, pos, neg):
        assert r.steps.tolist() == [1]
    for name in SERIES:  # untransformed: identical inputs in all three runs
        assert pos.series[f"raw_{name}"][0] == pytest.approx(plain.series[f"raw_{name}"][0], rel=1e-6)
        assert neg.series[f"raw_{name}"][0] == pytest.approx(plain.series[f"raw_{name}"][0], rel=1e-6)
    assert np.array_equal(pos.hists["raw_pos"], plain.hists["raw_pos"])
    assert plain.series["ft_pos_mean"][0] == pytest.approx(plain.series["raw_pos_mean"][0])
    assert pos.series["ft_pos_mean"][0] < plain.series["ft_pos_mean"][0] - 0.05
    assert neg.series["ft_neg_var"][0] < 0.9 * plain.series["ft_neg_var"][0]
    assert neg.series["ft_pos_mean"][0] == pytest.approx(plain.series["ft_pos_mean"][0], rel=1e-6)


def test_interpolation_at_half_halves_the_neg_variance():
    """lam_n = 0.5 mixes each negative with a random other one: Var(s') ~ (lam^2 + (1 - lam)^2) Var(s) = Var / 2."""
    torch.manual_seed(5)
    q, queue = unit(32, 128), unit(2048, 128)
    perm = torch.randperm(2048)
    plain = moco_logits(q, q, queue, T)
    mixed = moco_logits(q, q, NegativeMix(0.5, perm).apply(queue), T)
    stats = lambda lg: neg_score_stats(lg[:, 1:] * T, T, (-3.0, 3.0, 64))
    var = lambda lg: (lambda n: (n.sumsq / 2048 - (n.sum / 2048) ** 2).mean().item())(stats(lg))
    assert 0.4 < var(mixed) / var(plain) < 0.6


def test_resume_keeps_scores_exact_and_drops_chunks_past_the_checkpoint(tmp_path, data_cache):
    extra = {"scores.flush_every": 2}
    straight = run(tmp_path, "a", data_cache, **extra)
    run(tmp_path, "b", data_cache, **extra, **{"run.epochs_per_job": 1})
    # Other bins on resume would mix two binnings in one run: refused, naming both.
    with pytest.raises(ConfigError, match=r"binned as pos \[-4, 1\) in 240 bins.*this run bins them as pos \[-4, 1\) in 100"):
        train(load_config(None, tiny_overrides(tmp_path / "b", data_cache, **{**extra, "scores.bins": 100})))
    folder = tmp_path / "b" / "scores"
    # As if the job had been killed in epoch 2 after a flush: a chunk (and an orphan) past the checkpoint.
    index = json.loads((folder / "index.json").read_text())
    index["chunks"].append({**index["chunks"][-1], "file": "chunk_0000000004.npz", "first_step": 4, "last_step": 5})
    (folder / "chunk_0000000004.npz").write_bytes((folder / index["chunks"][0]["file"]).read_bytes())
    (folder / "index.json").write_text(json.dumps(index))
    (folder / "chunk_0000000099.npz").write_bytes(b"orphan")
    resumed = run(tmp_path, "b", data_cache, **extra)
    assert resumed.steps.tolist() == straight.steps.tolist() == [1, 2, 3, 4, 5, 6]
    assert resumed.chunk_last.tolist() == [2, 3, 5, 6]  # every flush_every steps and at each epoch end
    assert not (folder / "chunk_0000000099.npz").exists()
    for key in straight.series:
        np.testing.assert_array_equal(resumed.series[key], straight.series[key])
    for key in straight.hists:
        np.testing.assert_array_equal(resumed.hists[key], straight.hists[key])


def test_bad_bins_are_a_config_error():
    with pytest.raises(ConfigError, match="scores.pos_lo = 1.0 must be below scores.pos_hi = -1.0"):
        ScoresConfig(pos_lo=1.0, pos_hi=-1.0)
    with pytest.raises(ConfigError, match="need lo < hi"):
        BinSpec(0.5, 0.5, 10)
    with pytest.raises(ConfigError, match=r"scores.bins = 1 is out of range"):
        load_config(None, ["scores.bins=1"])


def test_flush_logs_interval_means_and_tensorboard_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastft.metrics import MetricsLog, read_metrics
    torch.manual_seed(6)
    log = MetricsLog(tmp_path, tensorboard=True)
    rec = ScoreRecorder(ScoresConfig(**BINS, flush_every=2), T, torch.device("cpu"), ScoreStore(tmp_path), log)
    rec.begin(0, None)
    for step in (1, 2):  # the second commit fills the chunk: flushed without an explicit flush()
        out, queue, _ = ft_step(n=12, k=50)
        rec.observe(out, queue)
        rec.commit(step, 0)
    log.close()
    got = read_scores(tmp_path)
    (record,) = [r for r in read_metrics(tmp_path) if r["kind"] == "scores"]
    assert record["step"] == 2 and record["pos_mean"] == pytest.approx(got.series["ft_pos_mean"].mean())
    assert record["raw_neg_var"] == pytest.approx(got.series["raw_neg_var"].mean())
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0}).Reload()
    assert {"scores/ft_pos", "scores/ft_neg", "scores/raw_pos", "scores/raw_neg"} <= set(acc.Tags()["histograms"])
    (neg,) = acc.Histograms("scores/ft_neg")
    assert neg.step == 2 and neg.histogram_value.num == 2 * 12 * 50
    assert sum(neg.histogram_value.bucket) == 2 * 12 * 50
    assert "scores/pos_mean" in acc.Tags()["scalars"]


def test_chunks_scale_with_the_epoch_length_by_default(tmp_path, data_cache):
    """scores.flush_every 0: about 10 chunks per epoch (here 3 steps per epoch: a chunk per step), at most 200."""
    got = run(tmp_path, "auto", data_cache)
    assert got.chunk_last.tolist() == [1, 2, 3, 4, 5, 6]
    from fastft.trainer import Trainer
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path / "long", data_cache, **{"run.steps_per_epoch": 0})))
    assert trainer.steps_per_epoch == 89 and trainer.scores.capacity == 9  # 1,437 images / 16 = 89 steps


def test_the_neg_variance_is_unbiased_as_torch_var():
    from fastft.score_stats import SAMPLE_SERIES, batch_means, per_sample
    torch.manual_seed(7)
    s = torch.randn(6, 37, dtype=torch.float64).float() * 0.3 + 0.1
    stats = neg_score_stats(s, T, (-3.0, 3.0, 16))
    rows = per_sample(s[:, 0], stats, 37, T)
    torch.testing.assert_close(rows[:, SAMPLE_SERIES.index("neg_var")], torch.var(s, dim=1), rtol=1e-4, atol=1e-6)
    means = batch_means(rows, stats, 37)
    assert means[SERIES.index("neg_var")].item() == pytest.approx(torch.var(s, dim=1).mean().item(), rel=1e-4)
    assert means[SERIES.index("neg_var")].item() != pytest.approx(torch.var(s, dim=1, unbiased=False).mean().item(),
                                                                  rel=1e-4)
