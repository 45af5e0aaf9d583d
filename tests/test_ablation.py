"""`python -m fastft.ablation` (make ablation): what the table and its observations say, from known numbers, and
one tiny end-to-end ablation (two variants, one seed, a few steps of the digits) that trains, probes and writes
the table, then is run again and reuses everything."""
import re
from pathlib import Path

from fastft.ablation import RunResult, collapsed, main, observations

HEALTHY = {"raw_pos_mean": 0.91, "raw_neg_mean": 0.42, "raw_neg_var": 0.18, "ft_pos_mean": 0.78,
           "ft_neg_mean": 0.40, "ft_neg_var": 0.15}
COLLAPSED = {"raw_pos_mean": 0.998, "raw_neg_mean": 0.998, "raw_neg_var": 2e-7, "ft_pos_mean": 0.996,
             "ft_neg_mean": 0.998, "ft_neg_var": 1e-7}


def result(variant, seed, knn, linear, scores, **kw) -> RunResult:
    return RunResult(variant, seed, Path(f"runs/{variant}_s{seed}"), knn_top1=knn, linear_top1=linear,
                     last_epoch=scores, final_loss=6.94, queue_size=1024, **kw)


def test_observations_report_gains_collapse_and_the_pixels():
    runs = [result("mocov2", 0, 0.50, 0.70, HEALTHY, knn_init_top1=0.30, linear_init_top1=0.65,
                   knn_pixels_top1=0.34),
            result("pos", 0, 0.40, 0.60, COLLAPSED)]
    assert collapsed(runs[1]) and not collapsed(runs[0])
    text = observations(runs, ["mocov2", "pos"])
    assert "MoCo v2: mean kNN top-1 +20.00 points against the same encoders at random initialisation (30.00)" in text
    assert "MoCo v2: mean linear top-1 +5.00 points" in text
    assert "+ pos extrapolation: the projection collapsed in 1 of 1 runs" in text
    assert "Raw pixels give kNN top-1 34.00; the best variant (MoCo v2) is +16.00 points from them." in text
    assert "No run collapsed" not in text
    assert "No run collapsed" in observations(runs[:1], ["mocov2"])


def test_a_tiny_ablation_trains_probes_writes_the_table_and_reuses_it(tmp_path, data_cache, capsys):
    args = ["--epochs", "1", "--seeds", "0", "--variants", "mocov2", "both", "--out", str(tmp_path / "runs"),
            "--table", str(tmp_path / "ABLATION.md"), f"data.cache_dir={data_cache}", "data.path=builtin:digits",
            "data.image_size=8", "loader.batch_size=16", "loader.workers=0", "model.queue_size=32",
            "run.steps_per_epoch=2", "linear.epochs=2", "run.tensorboard=false"]
    assert main(args) == 0
    table = (tmp_path / "ABLATION.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and not line.startswith("| variant")}
    number = re.compile(r"^\d+\.\d\d$")
    for name in ("MoCo v2", "+ both (full FT)"):
        cells = rows[name]
        assert number.match(cells[1]) and number.match(cells[3]), cells  # kNN and linear top-1 of seed 0
    assert number.match(rows["random init (same seeds)"][1]) and number.match(rows["random init (same seeds)"][3])
    assert number.match(rows["raw pixels"][2])
    assert "--compare-random-init" not in table.split("then probed as")[1].split("\n\n")[1]
    capsys.readouterr()
    assert main(args) == 0  # everything reused: no training, no probe trained again
    out = capsys.readouterr().out
    assert out.count("already trained, reusing it") == 2
    assert (tmp_path / "ABLATION.md").read_text().split("Written")[0] == table.split("Written")[0]
