"""Every command README.md shows in a ```bash block runs, so README and the code cannot drift apart.

The rule: each line of a ```bash block (a trailing backslash continues it, `#` starts a comment) is one command.
fastft commands (`fastft-*`, `python -m fastft.*`) run in order, in one scratch folder, with tiny overrides
appended (a step per epoch, small batch and queue); `make TARGET` must name a Makefile target and `pip install
".[EXTRAS]"` extras that pyproject.toml declares. Anything else in a bash block fails the test: give it a rule
here, or show it as an indented block (commands that need ImageNet, GPUs or several nodes).
"""
import importlib
import re
import shlex
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from fastft.pipelines.loader import available_backends

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["loader.batch_size=16", "loader.workers=0", "model.queue_size=32", "run.steps_per_epoch=1",
             "run.device=cpu", "run.tensorboard=false", "run.progress=false", "run.ckpt_every=1000", "knn.every=0",
             "linear.epochs=2"]
TAKES_OVERRIDES = {"fastft.train", "fastft.linear", "fastft.knn_cli", "fastft.bench.cli"}


def readme_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if (words := shlex.split(line, comments=True)):
                commands.append(shlex.join(words))
    return commands


def fastft_module(words: list[str]) -> tuple[str, list[str]] | None:
    """(module whose main() the command runs, its arguments), or None when it is not a fastft command."""
    if words[:2] == ["python", "-m"] and words[2].startswith("fastft."):
        module = {"fastft.bench": "fastft.bench.cli"}.get(words[2], words[2])
        return module, words[3:]
    scripts = {ep.name: ep.value.split(":")[0] for ep in entry_points(group="console_scripts")
               if ep.value.startswith("fastft.")}
    return (scripts[words[0]], words[1:]) if words[0] in scripts else None


def test_the_rule_finds_the_commands():
    commands = readme_commands("text\n```bash\nfastft-train demo \\\n  optim.epochs=5   # five\n# only a comment\n```\n"
                               "    fastft-train in1k\n```text\nnot run\n```\n")
    assert commands == ["fastft-train demo optim.epochs=5"]
    assert len(readme_commands((REPO / "README.md").read_text())) >= 10


def test_every_readme_command_runs(tmp_path, data_cache, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    makefile = (REPO / "Makefile").read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    tiny = [f"data.cache_dir={data_cache}", *OVERRIDES]
    ran = 0
    for command in readme_commands((REPO / "README.md").read_text()):
        words = shlex.split(command)
        if words[0] == "make":
            targets = [w for w in words[1:] if "=" not in w]
            assert targets and all(re.search(rf"^{t}:", makefile, re.M) for t in targets), command
            continue
        if words[:2] == ["pip", "install"]:
            wanted = re.search(r"\[(.*)\]", words[-1])
            assert not wanted or set(wanted.group(1).split(",")) <= set(extras), command
            continue
        found = fastft_module(words)
        assert found, f"README: no rule to run {command!r} (tests/test_readme.py)"
        module, args = found
        if module in TAKES_OVERRIDES and "--list-configs" not in args:
            args = [*args, *tiny]
        if module == "fastft.pipelines.convert_cli":
            if "ffcv" not in available_backends():  # installed without the ffcv extra (make install without root)
                continue
            args = [*args, "--cache-dir", data_cache, "--num-workers", "1"]
        status = importlib.import_module(module).main(args)
        out = capsys.readouterr()
        assert status == 0, f"README command {command!r} (run as {module} {args}): {out.err[-3000:]}"
        ran += 1
    assert ran >= 8
