"""`python -m fastft.ablation` (make ablation): what the table and its observations say, from known numbers; how
a table file keeps every section but the one written; one tiny end-to-end ablation (two variants, one seed, a few
steps of the digits) that trains, probes and writes its section, then is run again and reuses everything; and the
same under torchrun with 2 processes per run (gloo on the CPU)."""
import json
import re
from pathlib import Path

import pytest

from conftest import tiny_overrides
from fastft import checkpoint as ckpt_io
from fastft.ablation import (RUN_FILE, SECTION_END, RunResult, collapsed, main, observations, section_marker,
                             with_section, write_section)

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


def section(table: str, marker: str) -> str:
    """The text of one section of a table file, between its markers."""
    return table.split(f"{marker}\n", 1)[1].split(f"\n{SECTION_END}", 1)[0]


def rows(text: str) -> dict[str, list[str]]:
    """The table of a section: its first cell (the variant, or a baseline) -> the other cells."""
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")}


NUMBER = re.compile(r"^\d+\.\d\d$")


def assert_numbers_for(table: dict[str, list[str]], labels: list[str]) -> None:
    for name in labels:
        cells = table[name]
        assert NUMBER.match(cells[1]) and NUMBER.match(cells[3]), cells  # kNN and linear top-1 of seed 0
    assert NUMBER.match(table["random init (same seeds)"][1]) and NUMBER.match(table["random init (same seeds)"][3])


def test_writing_a_section_keeps_the_rest_of_the_file_byte_for_byte(tmp_path):
    scenes, digits = section_marker("demo", "builtin:scenes"), section_marker("demo", "builtin:digits")
    assert scenes == "<!-- ablation: demo builtin:scenes -->"
    path = tmp_path / "ABLATION.md"
    write_section(path, scenes, "## demo on `builtin:scenes`\n\n| a | b |\n")
    first = path.read_text()
    write_section(path, digits, "## demo on `builtin:digits`\n")
    both = path.read_text()
    assert both.startswith(first)  # the second dataset's section is added after the first, which stays as it was
    assert section(both, digits) == "## demo on `builtin:digits`"
    write_section(path, scenes, "## demo on `builtin:scenes`, again\n")  # rewrites its own section only
    again = path.read_text()
    assert section(again, scenes) == "## demo on `builtin:scenes`, again"
    assert again.split(digits)[1] == both.split(digits)[1] and again.split(scenes)[0] == both.split(scenes)[0]
    # A file from before the sections (one table, no markers) keeps its text above them, byte for byte.
    legacy = "# Ablation: Feature Transformation on the CPU\n\n| old | table |\n"
    assert with_section(legacy, scenes, "new").startswith(legacy + "\n" + scenes)
    with pytest.raises(RuntimeError, match="has no <!-- /ablation -->"):  # never rewrites up to another section
        with_section(f"{scenes}\ncut short\n{digits}\nx\n{SECTION_END}\n", scenes, "new")


def test_a_bad_config_or_an_override_the_ablation_sets_is_one_line_before_anything_trains(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here: --config demo is the packaged one
    for args, says in ((["--config", "nowhere"], "packaged config"),
                       (["ft.pos=none"], "the ablation sets ft.pos for each run (--variants)"),
                       ([f"run.out_dir={tmp_path / 'x'}"], "(--out)")):
        assert main([*args, "--epochs", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ABLATION.md").exists()


def test_a_tiny_ablation_trains_probes_writes_its_section_and_reuses_it(tmp_path, data_cache, capsys):
    # --threads 1: two torch threads per run beside other work on a 2-core machine take 3x as long.
    args = ["--threads", "1", "--epochs", "1", "--seeds", "0", "--variants", "mocov2", "both", "--out",
            str(tmp_path / "runs"),
            "--table", str(tmp_path / "ABLATION.md"), f"data.cache_dir={data_cache}", "data.path=builtin:digits",
            "data.image_size=8", "loader.batch_size=16", "loader.workers=0", "model.queue_size=32",
            "run.steps_per_epoch=2", "linear.epochs=2", "run.tensorboard=false"]
    # What the file held before: a table from before the sections, and another dataset's section.
    before = ("# Ablation: Feature Transformation on the CPU\n\n| old | table |\n\n"
              f"{section_marker('demo', 'builtin:scenes')}\n## demo on `builtin:scenes`\n{SECTION_END}\n")
    (tmp_path / "ABLATION.md").write_text(before)
    assert main(args) == 0
    whole = (tmp_path / "ABLATION.md").read_text()
    assert whole.startswith(before)
    table = section(whole, section_marker("demo", "builtin:digits"))
    assert table.startswith("## demo on `builtin:digits`")
    assert_numbers_for(rows(table), ["MoCo v2", "+ both (full FT)"])
    assert rows(table)["MoCo v2"][0] == "`ft.pos=none ft.neg=none`"
    assert NUMBER.match(rows(table)["raw pixels"][2])
    probe = table.split("then probed as")[1].split("\n\n")[1]
    assert "--compare-random-init" not in probe and probe.strip().startswith("python -m fastft.linear demo ")
    capsys.readouterr()
    assert main(args) == 0  # everything reused: no training, no probe trained again
    out = capsys.readouterr().out
    assert out.count("already trained, reusing it") == 2
    again = (tmp_path / "ABLATION.md").read_text()
    assert again.startswith(before) and again.split("Written")[0] == whole.split("Written")[0]


def test_under_torchrun_every_run_and_probe_has_two_processes(tmp_path, data_cache):
    """--nproc-per-node 2: each run and probe is `torchrun --standalone --nproc_per_node 2` (gloo on the CPU)."""
    # tiny_overrides, less the keys the ablation sets for each run (folder, epochs, when kNN runs).
    owned = ("run.out_dir=", "optim.epochs=", "knn.every=")
    tiny = [o for o in tiny_overrides(tmp_path, data_cache, **{"run.steps_per_epoch": 2, "linear.epochs": 1})
            if not o.startswith(owned)]
    out, table_file = tmp_path / "runs", tmp_path / "ABLATION.md"
    assert main(["--nproc-per-node", "2", "--threads", "1", "--epochs", "1", "--seeds", "0", "--variants", "mocov2",
                 "both", "--out", str(out), "--table", str(table_file), *tiny]) == 0
    table = section(table_file.read_text(), section_marker("demo", "builtin:digits"))
    assert_numbers_for(rows(table), ["MoCo v2", "+ both (full FT)"])
    assert "python -m torch.distributed.run --standalone --nproc_per_node 2 -m fastft.train demo " in table
    assert "python -m torch.distributed.run --standalone --nproc_per_node 2 -m fastft.linear demo " in table
    assert "batch 16x2" in table  # the recipe line
    for run in ("mocov2_s0", "both_s0"):
        log = (out / run / "train.log").read_text()
        assert "steps/epoch, batch 16x2" in log and re.search(r"linear probe: .* batch \d+x2", log), log[-3000:]
        assert ckpt_io.load(ckpt_io.list_checkpoints(out / run)[0])["world_size"] == 2
        assert json.loads((out / run / RUN_FILE).read_text())["nproc_per_node"] == 2
