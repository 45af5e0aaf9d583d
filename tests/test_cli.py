"""The commands as a user meets them: usage under the installed names, a help text for every option, and
progress that suits where the output goes (a live bar on a terminal, one line per epoch in a log)."""
import argparse
import importlib
import io
import sys

import pytest

from conftest import tiny_overrides
from fastft.train import main as train_main

COMMANDS = {  # module -> the name users type
    "fastft.train": "fastft-train", "fastft.knn_cli": "fastft-knn", "fastft.linear": "fastft-linear",
    "fastft.viz": "fastft-viz", "fastft.export": "fastft-export", "fastft.bench.cli": "fastft-bench",
    "fastft.pipelines.convert_cli": "fastft-convert-dataset", "fastft.ablation": "python -m fastft.ablation",
}


class _Parser(Exception):
    pass


def command_parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser `module.main` builds, caught as it starts parsing."""
    def grab(self, *args, **kwargs):
        raise _Parser(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", grab)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_intermixed_args", grab)
    with pytest.raises(_Parser) as caught:
        importlib.import_module(module).main([])
    return caught.value.args[0]


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_usage_names_the_installed_command_and_every_option_has_help(module, monkeypatch):
    ap = command_parser(module, monkeypatch)
    assert ap.prog == COMMANDS[module]
    assert ap.format_usage().startswith(f"usage: {COMMANDS[module]} ")
    assert [a.dest for a in ap._actions if not a.help] == []
    text = ap.format_help()  # for users: no notes about which module imports which
    for developer_note in ("import", "entry point", "fastft/", "docs/"):  # nor source files an installed copy lacks
        assert developer_note not in text, developer_note


def test_progress_is_one_line_per_epoch_in_a_log_and_a_live_bar_on_a_terminal(tmp_path, data_cache, monkeypatch,
                                                                               capsys):
    def run(out, tty: bool) -> str:
        err = io.StringIO()
        err.isatty = lambda: tty
        monkeypatch.setattr(sys, "stderr", err)
        assert train_main(["demo", *tiny_overrides(out, data_cache, **{"run.progress": True})]) == 0
        monkeypatch.undo()
        return err.getvalue() + capsys.readouterr().out

    log = run(tmp_path / "log", tty=False)
    assert "\r" not in log
    assert [line.split()[:2] for line in log.splitlines() if line.startswith("epoch ")] == [["epoch", "1/2"],
                                                                                           ["epoch", "2/2"]]
    live = run(tmp_path / "tty", tty=True)
    assert "\r" in live and "epoch 1/2:" in live  # tqdm's frames, redrawn in place


def test_ablation_finds_a_packaged_config_from_any_folder(tmp_path, monkeypatch, capsys):
    from fastft.ablation import config_name, main as ablation_main
    monkeypatch.chdir(tmp_path)  # no configs/ here: --config demo (the default) is the packaged one
    assert config_name("demo") == config_name("configs/demo.yaml") == "demo"
    assert ablation_main(["--config", "nowhere", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "packaged config" in err[0]


def test_convert_without_ffcv_says_which_extra(tmp_path, monkeypatch, capsys):
    from fastft.pipelines.convert_cli import main as convert_main
    monkeypatch.setitem(sys.modules, "fastft.pipelines.ffcv_loader", None)  # as if ffcv were not installed
    assert convert_main(["builtin:digits", str(tmp_path / "d" / "val.beton"), "--split", "val"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'fastft[ffcv]'" in err[0] and not (tmp_path / "d").exists()
