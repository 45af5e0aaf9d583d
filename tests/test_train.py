"""End-to-end training on the built-in digits: exact resume, atomic checkpoints, refused checkpoints."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import tiny_overrides
from fastft import checkpoint as ckpt_io
from fastft.config import load_config
from fastft.metrics import read_metrics
from fastft.train import main
from fastft.trainer import Trainer, train


def cfg_for(out_dir, cache, **extra):
    return load_config(None, tiny_overrides(out_dir, cache, **extra))


def final_state(out_dir):
    path = ckpt_io.list_checkpoints(out_dir)[0]
    return ckpt_io.load(path)


def test_resume_is_exact(tmp_path, data_cache):
    straight = train(cfg_for(tmp_path / "a", data_cache))
    first = train(cfg_for(tmp_path / "b", data_cache, **{"run.epochs_per_job": 1}))
    assert first["epoch"] == 1
    resumed = train(cfg_for(tmp_path / "b", data_cache))
    assert resumed["epoch"] == 2 and resumed["step"] == straight["step"] == 6

    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name  # parameters, queue, pointer, BN stats
    assert a["history"] == b["history"] and len(a["history"]) == 2
    steps = lambda d: [(r["step"], r["loss"]) for r in read_metrics(d) if r["kind"] == "train"]
    assert steps(tmp_path / "a") == steps(tmp_path / "b") and len(steps(tmp_path / "a")) == 6


def test_metrics_past_the_checkpoint_are_dropped_on_resume(tmp_path, data_cache):
    out = tmp_path / "run"
    train(cfg_for(out, data_cache, **{"run.epochs_per_job": 1}))
    with open(out / "metrics.jsonl", "a") as f:  # as if the job died mid-epoch 2 after logging step 5
        f.write('{"kind": "train", "step": 5, "epoch": 1, "loss": 123.0}\n')
    train(cfg_for(out, data_cache))
    losses = [r["loss"] for r in read_metrics(out) if r["kind"] == "train"]
    assert 123.0 not in losses and len(losses) == 6


KILL_WHILE_SAVING = textwrap.dedent("""
    import os, signal, sys
    from fastft import checkpoint as ckpt_io
    from fastft.atomic import write_atomic
    path = ckpt_io.checkpoint_path(sys.argv[1], 2)
    real_fsync = os.fsync
    def die(fd):  # the temp file is fully written but not yet renamed: the worst moment
        os.kill(os.getpid(), signal.SIGKILL)
    os.fsync = die
    write_atomic(path, {"format": "fastft-checkpoint", "version": 1, "junk": list(range(10))})
""")


def test_kill_while_writing_leaves_previous_checkpoint(tmp_path, data_cache):
    out = tmp_path / "run"
    train(cfg_for(out, data_cache, **{"run.epochs_per_job": 1}))
    good = ckpt_io.list_checkpoints(out)
    assert [p.name for p in good] == ["epoch_0001.pt"]
    proc = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, str(out)], capture_output=True)
    assert proc.returncode == -9
    assert not ckpt_io.checkpoint_path(out, 2).exists()
    assert any(p.name.startswith(".epoch_0002.pt.tmp") for p in (out / "checkpoints").iterdir())
    path, ckpt = ckpt_io.newest_good(out)
    assert path == good[0] and ckpt["epoch"] == 1
    # A truncated newer file (e.g. a partial copy) is skipped with a warning; resume still works.
    ckpt_io.checkpoint_path(out, 3).write_bytes(good[0].read_bytes()[:1000])
    with pytest.warns(UserWarning, match="epoch_0003.pt cannot be read"):
        path, _ = ckpt_io.newest_good(out)
    assert path == good[0]
    with pytest.warns(UserWarning, match="epoch_0003.pt moved to .*unreadable"):
        assert train(cfg_for(out, data_cache))["epoch"] == 2
    assert not list(out.rglob("*.tmp-*"))  # the killed writer's temp file was removed on resume


def test_a_killed_writers_temp_files_go_and_a_live_ones_stay(tmp_path, data_cache):
    import os

    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [out / "checkpoints" / f".epoch_0001.pt.tmp-{dead.stdout.strip()}",
             out / "scores" / f".index.json.tmp-{dead.stdout.strip()}"]
    live = out / "linear" / "trained" / f".metrics.jsonl.tmp-{os.getppid()}"  # e.g. a probe writing beside it
    for p in stale + [live]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    train(cfg_for(out, data_cache, **{"optim.epochs": 1}))
    assert [p.exists() for p in stale] == [False, False] and live.exists()


def test_a_fresh_start_after_a_kill_logs_each_step_once(tmp_path, data_cache):
    out = tmp_path / "run"
    out.mkdir()
    # An attempt killed before its first checkpoint: records no checkpoint holds, the last line cut short.
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "epoch": 0, "loss": 9.0}\n{"kind": "tra')
    train(cfg_for(out, data_cache))
    records = read_metrics(out)
    keys = [(r["kind"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)) and 9.0 not in [r.get("loss") for r in records]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 7))


def test_checkpoint_from_another_config_is_refused(tmp_path, data_cache):
    out = tmp_path / "run"
    train(cfg_for(out, data_cache, **{"run.epochs_per_job": 1}))
    with pytest.raises(ckpt_io.CheckpointError, match=r"model.momentum: checkpoint 0.9 vs config 0.5"):
        train(cfg_for(out, data_cache, **{"model.momentum": 0.5}))
    # Logging-only keys may change between jobs.
    assert train(cfg_for(out, data_cache, **{"run.log_every": 2}))["epoch"] == 2


def test_a_checkpoint_older_than_a_config_key_resumes_only_at_its_default(tmp_path):
    from fastft.config import Config

    old = load_config(None).to_dict()
    del old["ft"]["share_lambdas"]  # written before the key existed: it ran with the default behaviour
    defaults = Config().to_dict()
    ckpt_io.check_compatible(old, load_config(None).to_dict(), tmp_path / "c.pt", defaults=defaults)
    with pytest.raises(ckpt_io.CheckpointError, match=r"ft.share_lambdas: checkpoint '<missing>' vs config True"):
        ckpt_io.check_compatible(old, load_config(None, ["ft.share_lambdas=true"]).to_dict(), tmp_path / "c.pt",
                                 defaults=defaults)


def test_non_checkpoint_files_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="not a fastft checkpoint"):
        ckpt_io.load(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ckpt_io.CheckpointError, match="cannot be read"):
        ckpt_io.load(tmp_path / "text.pt")


def test_knn_monitor_and_cli_report(tmp_path, data_cache, capsys):
    out = tmp_path / "run"
    rc = main(["configs/demo.yaml", *tiny_overrides(out, data_cache, **{"knn.every": 1, "knn.pixels": True,
                                                                          "optim.epochs": 1})])
    assert rc == 0
    knn = [r for r in read_metrics(out) if r["kind"] in ("knn", "epoch")]
    assert knn[0]["step"] == 0 and 0 < knn[0]["random_init_top1"] <= 1 and 0 < knn[0]["pixels_top1"] <= 1
    assert 0 < knn[1]["knn_top1"] <= 1
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "trained" in err and "random init" in err and "pixels (eval transform)" in err


def test_cli_reports_config_errors(tmp_path, capsys):
    rc = main(["configs/demo.yaml", "model.arch=resnet9"])
    assert rc == 2
    assert "model.arch = 'resnet9' is not valid; expected one of 'resnet18'" in capsys.readouterr().err


def test_batch_larger_than_dataset_is_a_clear_error(tmp_path, data_cache):
    with pytest.raises(Exception, match="larger than the 1437 training images"):
        train(cfg_for(tmp_path / "r", data_cache, **{"loader.batch_size": 5000}))


def test_starting_a_finished_run_again_keeps_its_report(tmp_path, data_cache):
    cfg = cfg_for(tmp_path, data_cache, **{"optim.epochs": 1, "run.steps_per_epoch": 1, "knn.every": 1})
    first = train(cfg)
    assert first["knn_top1"] is not None and first["knn_init_top1"] is not None
    again = train(cfg)  # nothing left to train: the report stands, nothing is measured again
    assert again == first == json.loads((tmp_path / "summary.json").read_text())
    # Killed between the last checkpoint and summary.json: the next start rebuilds it whole, from the checkpoint
    # and metrics.jsonl, measuring nothing again.
    (tmp_path / "summary.json").unlink()
    assert train(cfg) == first == json.loads((tmp_path / "summary.json").read_text())


def truncated_copy(good, dest):
    dest.write_bytes(good.read_bytes()[:1000])


def test_unreadable_newer_files_never_cost_a_readable_checkpoint(tmp_path, data_cache):
    """Truncated copies named as the newest epochs: resume from the newest file that loads, the copies set aside
    (not deleted, never counted as newest), and pruning keeps the new run's checkpoints."""
    out = tmp_path / "run"
    train(cfg_for(out, data_cache, **{"run.epochs_per_job": 1, "run.keep_ckpts": 1}))
    (good,) = ckpt_io.list_checkpoints(out)
    for epoch in (98, 99):
        truncated_copy(good, ckpt_io.checkpoint_path(out, epoch))
    with pytest.warns(UserWarning, match="epoch_0099.pt moved to .*unreadable/epoch_0099.pt"):
        assert train(cfg_for(out, data_cache, **{"run.keep_ckpts": 1}))["epoch"] == 2
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["epoch_0002.pt"]
    assert ckpt_io.load(ckpt_io.checkpoint_path(out, 2))["epoch"] == 2
    assert sorted(p.name for p in (out / "checkpoints" / "unreadable").iterdir()) == ["epoch_0098.pt",
                                                                                        "epoch_0099.pt"]


def test_pruning_sets_aside_what_does_not_load(tmp_path, data_cache):
    out = tmp_path / "run"
    train(cfg_for(out, data_cache, **{"run.epochs_per_job": 1}))
    (good,) = ckpt_io.list_checkpoints(out)
    truncated_copy(good, ckpt_io.checkpoint_path(out, 7))  # appears after the run chose its checkpoint
    with pytest.warns(UserWarning, match="epoch_0007.pt moved to"):
        ckpt_io.prune(out, keep=1)
    assert ckpt_io.list_checkpoints(out) == [good]


def test_only_unreadable_checkpoints_stop_the_run_until_told_to_start_afresh(tmp_path, data_cache, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "epoch_0005.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["configs/demo.yaml", *tiny_overrides(out, data_cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epoch_0005.pt" in err[0] and "run.resume=none" in err[0], err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written, nothing moved
    with pytest.warns(UserWarning, match="epoch_0005.pt moved to"):
        assert main(["configs/demo.yaml", *tiny_overrides(out, data_cache, **{"run.resume": "none"})]) == 0
    assert (out / "checkpoints" / "unreadable" / "epoch_0005.pt").is_file()
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["epoch_0002.pt", "epoch_0001.pt"]


def test_starting_afresh_sets_an_earlier_runs_checkpoints_aside(tmp_path, data_cache):
    """A fresh start in a folder of a longer earlier run: its higher-numbered checkpoints must not make pruning
    delete the new run's."""
    out = tmp_path / "run"
    train(cfg_for(out, data_cache, **{"optim.epochs": 3, "run.keep_ckpts": 1}))
    with pytest.warns(UserWarning, match="epoch_0003.pt moved to .*earlier"):
        train(cfg_for(out, data_cache, **{"run.resume": "none", "run.keep_ckpts": 1}))
    assert [p.name for p in ckpt_io.list_checkpoints(out)] == ["epoch_0002.pt"]
    earlier = out / "checkpoints" / "earlier"
    assert sorted(p.name for p in earlier.iterdir()) == ["epoch_0003.pt", "metrics.jsonl"]  # its records go along
    assert [r["step"] for r in read_metrics(earlier) if r["kind"] == "train"] == list(range(1, 10))
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == list(range(1, 7))


def test_evaluation_keys_may_change_on_resume(tmp_path, data_cache):
    out = tmp_path / "run"
    train(cfg_for(out, data_cache, **{"run.epochs_per_job": 1, "knn.every": 0}))
    resumed = train(cfg_for(out, data_cache, **{"knn.every": 1, "knn.k": 20, "scores.untransformed": False}))
    assert resumed["epoch"] == 2 and resumed["knn_top1"] is not None  # measured at the end, with k 20


def test_extending_optim_epochs_continues_on_the_schedule_of_the_new_length(tmp_path, data_cache):
    from fastft.schedule import base_lr, lr_at

    short, long = tmp_path / "short", tmp_path / "long"
    train(cfg_for(short, data_cache))  # 2 epochs of 3 steps, finished
    extended = train(cfg_for(short, data_cache, **{"optim.epochs": 3}))
    assert extended["epoch"] == 3 and len(extended["loss_history"]) == 3
    lrs = {r["step"]: r["lr"] for r in read_metrics(short) if r["kind"] == "train"}
    cfg = cfg_for(long, data_cache, **{"optim.epochs": 3})
    peak = base_lr(cfg.optim, cfg.loader.batch_size)
    # Steps 1-6 ran on the 2-epoch cosine; from step 7 on, the lr is the 3-epoch run's (it rises at the resume).
    assert lrs[6] == pytest.approx(lr_at(5, 6, 0, peak)) and lrs[7] == pytest.approx(lr_at(6, 9, 0, peak))
    assert lrs[7] > lrs[6]
    with pytest.raises(ckpt_io.CheckpointError, match=r"has trained 3 epochs, more than optim.epochs = 2"):
        train(cfg_for(short, data_cache, **{"optim.epochs": 2}))


def test_a_refused_resume_leaves_the_run_folder_unchanged(tmp_path, data_cache, capsys):
    out = tmp_path / "run"
    train(cfg_for(out, data_cache, **{"run.epochs_per_job": 1}))
    snapshot = lambda: {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    before = snapshot()
    assert main(["configs/demo.yaml", *tiny_overrides(out, data_cache, **{"model.momentum": 0.5})]) == 2
    assert "model.momentum: checkpoint 0.9 vs config 0.5" in capsys.readouterr().err
    assert snapshot() == before


def test_starting_a_finished_run_prints_one_line(tmp_path, data_cache, capsys):
    out = tmp_path / "run"
    argv = ["configs/demo.yaml", *tiny_overrides(out, data_cache, **{"optim.epochs": 1})]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and "finished before (1/1 epochs)" in lines[0], lines


def test_run_threads_sets_torchs_cpu_threads(tmp_path, data_cache):
    before = torch.get_num_threads()
    try:
        Trainer(load_config(None, tiny_overrides(tmp_path, data_cache, **{"run.threads": 1})))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        Trainer(load_config(None, tiny_overrides(tmp_path / "b", data_cache)))  # 0: torch's default stays
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
