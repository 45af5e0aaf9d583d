"""fastft-viz: real figures (not blank, the expected series drawn), an index page that shows them, clear errors."""
import json
import re
import shutil

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import tiny_overrides
from fastft.config import load_config
from fastft.trainer import train
from fastft.viz import main as viz_main


KNN, LINEAR = 0.8125, 0.9031


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    """Two tiny runs: plain MoCo without untransformed stats; full FT with them, two chunks per epoch.

    Their accuracies are written where fastft.train (summary.json) and fastft.linear (a "linear" record in
    metrics.jsonl) put them: a real kNN evaluation costs a minute of CPU here.
    """
    root = tmp_path_factory.mktemp("viz-runs")
    train(load_config(None, tiny_overrides(root / "plain", data_cache, **{
        "ft.pos": "none", "ft.neg": "none", "scores.untransformed": False})))
    train(load_config(None, tiny_overrides(root / "both", data_cache, **{"scores.flush_every": 2})))
    summary = json.loads((root / "plain" / "summary.json").read_text())
    (root / "plain" / "summary.json").write_text(json.dumps({**summary, "knn_top1": KNN, "knn_init_top1": 0.7,
                                                             "knn_pixels_top1": 0.6}))
    with open(root / "both" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "linear", "step": 6, "epoch": 2, "top1": LINEAR, "encoder": "pretrained"}) + "\n")
        f.write(json.dumps({"kind": "linear", "step": 6, "epoch": 2, "top1": 0.5, "encoder": "random_init"}) + "\n")
    return root


@pytest.fixture(scope="module")
def drawn(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("viz-out")
    assert viz_main([str(runs / "plain"), str(runs / "both"), "--out", str(out)]) == 0
    return out


def ids(svg_path, prefix):
    return re.findall(rf'id="({prefix}:[^"]*)"', svg_path.read_text())


def test_every_figure_is_written_and_not_blank(drawn):
    names = ["curves", "ft_effect", "final", "density_0_plain", "density_1_both", "epochs_0_plain", "epochs_1_both"]
    for name in names:
        assert (drawn / f"{name}.svg").stat().st_size > 5000, name
        img = imread(drawn / f"{name}.png")
        assert img.shape[0] > 200 and img.shape[1] > 400, name
        rgb = img[..., :3].reshape(-1, 3)
        inked = (rgb < 0.9).any(axis=1).mean()  # pixels that are not (near) white background
        assert inked > 0.03, (name, inked)
        assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 30, name  # lines, text, colour maps
    # The density images are mostly colour map, not white.
    dens = imread(drawn / "density_1_both.png")[..., :3]
    assert (dens.reshape(-1, 3) < 0.9).any(axis=1).mean() > 0.3


def test_the_expected_series_are_drawn(drawn):
    # curves: every score series x 2 runs, on the features used in the loss only, and each run's training loss.
    got = ids(drawn / "curves.svg", "series")
    assert len(got) == 12 and sorted({g.split(":")[1] for g in got}) == [
        "exp_neg_mean", "exp_pos_mean", "loss", "neg_mean", "neg_var", "pos_mean"]
    # ft_effect: + the untransformed curves of the one run that logged them (no loss there).
    got = ids(drawn / "ft_effect.svg", "series")
    assert len(got) == 15 and sum(g.endswith(":raw") for g in got) == 5
    assert all(":1_both:" in g for g in got if g.endswith(":raw"))
    # One density curve per epoch and kind (2 epochs); the FT run also has the untransformed row.
    assert len(ids(drawn / "epochs_0_plain.svg", "epoch")) == 4
    assert len(ids(drawn / "epochs_1_both.svg", "epoch")) == 8
    assert len(ids(drawn / "final.svg", "final")) == 4
    assert len(ids(drawn / "density_1_both.svg", "mean")) == 4 and len(ids(drawn / "density_0_plain.svg", "mean")) == 2


def test_legend_carries_each_runs_final_accuracy(drawn):
    svg = (drawn / "curves.svg").read_text()  # SVG text is kept as text (svg.fonttype none)
    assert "plain (kNN 81.2%)" in svg
    assert "both (linear 90.3%)" in svg  # the pretrained encoder's probe, not the random-init baseline
    final = (drawn / "final.svg").read_text()
    assert "plain (kNN 81.2%), epoch 2" in final and "both (linear 90.3%), epoch 2" in final


def test_panels_have_axis_labels_and_an_epoch_axis(drawn):
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", (drawn / "curves.svg").read_text())
    for label in ("InfoNCE loss (nats)", "mean of q\u0302\u00b7k\u0302", "mean of q\u0302\u00b7n",
                  "variance of q\u0302\u00b7n over K (unbiased)", "batch mean of exp(q\u0302\u00b7k\u0302 / T)",
                  "batch mean of mean over K of exp(q\u0302\u00b7n / T)", "exp(pos / T)", "mean exp(neg / T)"):
        assert label in texts, label
    assert texts.count("iteration") == 6 and texts.count("epoch") == 6  # both x axes on all six panels


def test_run_table_has_the_baselines(drawn):
    page = (drawn / "index.html").read_text()
    for head in ("kNN random init", "linear random init", "kNN pixels"):
        assert f"<th>{head}</th>" in page
    plain = re.search(r"<tr><td>plain</td>.*?</tr>", page).group(0)
    assert re.findall(r"<td>([\d.]+%|-)</td>", plain) == ["81.2%", "-", "70.0%", "-", "60.0%"]
    both = re.search(r"<tr><td>both</td>.*?</tr>", page).group(0)
    assert re.findall(r"<td>([\d.]+%|-)</td>", both) == ["-", "90.3%", "-", "50.0%", "-"]


def test_index_shows_every_figure_and_config(drawn):
    page = (drawn / "index.html").read_text()
    refs = set(re.findall(r'(?:src|href)="([^"]+)"', page))
    files = {p.name for p in drawn.iterdir() if p.suffix in (".png", ".svg")}
    assert files and files <= refs, files - refs
    assert all((drawn / r).is_file() for r in refs)
    assert page.count("config.yaml</summary>") == 2 and "queue_size: 40" in page


def test_missing_run_folder_is_a_clear_error(tmp_path, capsys):
    assert viz_main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert f"run folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_run_without_scores_is_a_clear_error(tmp_path, runs, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(runs / "plain", bare, ignore=shutil.ignore_patterns("scores"))
    assert viz_main([str(bare), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bare} has no score statistics yet" in err and "scores.enabled=true" in err


def test_runs_with_different_bins_are_a_clear_error(tmp_path, runs, data_cache, capsys):
    other = tmp_path / "other"
    train(load_config(None, tiny_overrides(other, data_cache, **{
        "optim.epochs": 1, "run.steps_per_epoch": 1, "scores.bins": 100, "scores.neg_lo": -2.0})))
    assert viz_main([str(runs / "both"), str(other), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "logged scores with different bins" in err and "[-2, 3) in 100 bins" in err and "in 240 bins" in err
    assert not (tmp_path / "o" / "index.html").exists()


def test_no_duplicate_panels_when_ft_leaves_the_positives_alone(tmp_path, data_cache):
    run = tmp_path / "negonly"
    train(load_config(None, tiny_overrides(run, data_cache, **{
        "ft.pos": "none", "optim.epochs": 1, "run.steps_per_epoch": 2})))
    assert viz_main([str(run), "--out", str(tmp_path / "o")]) == 0
    effect = ids(tmp_path / "o" / "ft_effect.svg", "series")
    raw = sorted(g.split(":")[1] for g in effect if g.endswith(":raw"))
    assert raw == ["exp_neg_mean", "neg_mean", "neg_var"]  # the untransformed pos curves would repeat the others
    epochs = ids(tmp_path / "o" / "epochs_0_negonly.svg", "epoch")
    assert sorted({g.split(":")[1] + ":" + g.split(":")[2] for g in epochs}) == ["ft:neg", "ft:pos", "raw:neg"]
    assert sorted(ids(tmp_path / "o" / "density_0_negonly.svg", "mean")) == [
        "mean:ft:neg", "mean:ft:pos", "mean:raw:neg"]
    assert "untransformed pos scores = those used in the loss" in (tmp_path / "o" / "density_0_negonly.svg").read_text()


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("sweep")
    for m in (0.999, 0.9, 0.99):  # not in order: the figure orders them
        train(load_config(None, tiny_overrides(root / f"m{m}", data_cache, **{
            "model.momentum": m, "optim.epochs": 1, "run.steps_per_epoch": 3})))
    return root


def test_sweep_stacks_the_runs_along_the_one_key_they_differ_in(sweep_runs, tmp_path, capsys):
    out = tmp_path / "o"
    given = [str(sweep_runs / m) for m in ("m0.99", "m0.999", "m0.9")]
    assert viz_main(given + ["--sweep", "--out", str(out)]) == 0
    got = ids(out / "sweep.svg", "sweep")
    assert len(got) == 9
    stats = {g.split(":")[1] for g in got}
    assert stats == {"pos_mean", "neg_mean", "neg_var"}
    # Runs in the key's order, labelled by its value, on the sweep axis and in the page.
    order = [g.split(":")[2] for g in got if g.split(":")[1] == "neg_var"]
    assert order == ["0_momentum_0.9", "1_momentum_0.99", "2_momentum_0.999"]
    svg = (out / "sweep.svg").read_text()
    assert "model.momentum" in svg and "momentum=0.99" in svg
    assert len(ids(out / "sweep_final.svg", "sweep_final")) == 6
    page = (out / "index.html").read_text()
    assert 'src="sweep.png"' in page and "stacked along model.momentum" in page


def test_sweep_needs_one_differing_key(runs, sweep_runs, tmp_path, capsys):
    assert viz_main([str(runs / "plain"), str(runs / "both"), "--sweep", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "differ in" in err and "ft.neg" in err and "--key" in err
    assert viz_main([str(runs / "plain"), str(runs / "both"), "--sweep", "--key", "ft.neg",
                     "--out", str(tmp_path / "o")]) == 0
    assert viz_main([str(sweep_runs / "m0.9"), str(sweep_runs / "m0.9"), "--sweep", "--out",
                     str(tmp_path / "o2")]) == 2
    assert "same config" in capsys.readouterr().err
    assert viz_main([str(sweep_runs / "m0.9"), str(sweep_runs / "m0.99"), "--sweep", "--key", "model.nope",
                     "--out", str(tmp_path / "o3")]) == 2
    assert "--key model.nope: not a key" in capsys.readouterr().err
