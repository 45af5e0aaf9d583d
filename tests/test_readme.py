"""Every command README.md shows runs, so README and the code cannot drift apart.

README shows commands only in ```bash blocks (a test checks that no indented block holds one); each line of such a
block (a trailing backslash continues it, `#` starts a comment) is one command, run by these rules:
- fastft commands (`fastft-*`, `python -m fastft.*`) run in order, in one scratch folder, with tiny overrides
  appended (a step per epoch, small batch and queue; `fastft-bench`: one step, one repeat).
- What this machine lacks is stood in for (stand_ins): `/data/imagenet` is a tiny ImageFolder of the hundred
  ImageNet-100 classes (the ImageNet configs get `data.path` pointed at it, 32x32 images, one epoch, so their
  `epoch_0200.pt` is `epoch_0001.pt`), `--device cuda` runs on the CPU when there is no GPU, and
  `--synthetic-data N` writes at most 32 images.
- `torchrun OPTIONS -m MODULE ARGS` (after any `VAR=value`): torchrun's own parser checks OPTIONS, then MODULE
  runs as one process (several processes are tested in tests/test_distributed.py).
- `python scripts/NAME.py ARGS`: the script's parser checks ARGS; the scripts run in their own tests.
- `make TARGET` must name a Makefile target and `pip install ".[EXTRAS]"` extras that pyproject.toml declares.
Anything else in a bash block fails the test: give it a rule here.
"""
import functools
import importlib
import importlib.util
import re
import shlex
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.distributed.run import get_args_parser as torchrun_parser

from fastft.pipelines.loader import available_backends

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["loader.batch_size=16", "loader.workers=0", "model.queue_size=32", "run.steps_per_epoch=1",
             "run.device=cpu", "run.tensorboard=false", "run.progress=false", "run.ckpt_every=1000", "knn.every=0",
             "linear.epochs=2", "linear.batch_size=16"]
BENCH = ["--steps", "1", "--warmup", "1", "--repeats", "1"]  # ddp needs a warm-up step
IMAGENET_CONFIGS = {"in1k", "in100", "configs/in1k.yaml", "configs/in100.yaml"}
TAKES_OVERRIDES = {"fastft.train", "fastft.linear", "fastft.knn_cli", "fastft.bench.cli"}
COMMAND_WORDS = {"make", "pip", "python", "torchrun"}


def readme_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if (words := shlex.split(line, comments=True)):
                commands.append(shlex.join(words))
    return commands


def indented_lines(text: str) -> list[str]:
    """Lines of indented (4-space) code blocks outside fences: README shows no command in one."""
    lines, fenced, prev_blank, in_block = [], False, True, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            in_block = line.startswith("    ") and (in_block or prev_blank) and not line.lstrip().startswith("- ")
            if in_block:
                lines.append(line.strip())
        prev_blank = not line.strip()
    return lines


@functools.cache
def fastft_scripts() -> dict[str, str]:
    """console script -> module, scanned once (the entry points do not change during a run)."""
    return {ep.name: ep.value.split(":")[0] for ep in entry_points(group="console_scripts")
            if ep.value.startswith("fastft.")}


def without_env(words: list[str]) -> list[str]:
    """The command after any leading `VAR=value` assignments."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    return words


def looks_like_command(line: str) -> bool:
    words = without_env(line.split())
    return bool(words) and (words[0] in COMMAND_WORDS or words[0].startswith("fastft-")
                            or words[0].endswith("/python"))


def fastft_module(words: list[str]) -> tuple[str, list[str]] | None:
    """(module whose main() the command runs, its arguments), or None when it is not a fastft command."""
    if words[:2] == ["python", "-m"] and words[2].startswith("fastft."):
        module = {"fastft.bench": "fastft.bench.cli"}.get(words[2], words[2])
        return module, words[3:]
    scripts = fastft_scripts()
    return (scripts[words[0]], words[1:]) if words[0] in scripts else None


def torchrun_module(words: list[str]) -> list[str] | None:
    """`python -m MODULE ARGS` for a torchrun line (its options checked by torchrun's parser), else None."""
    words = without_env(words)
    if not words or words[0] != "torchrun":
        return None
    assert "-m" in words, f"torchrun without -m MODULE: {shlex.join(words)}"
    cut = words.index("-m")
    ns = torchrun_parser().parse_args([*words[1:cut], "--module", *words[cut + 1:]])  # exits on a bad option
    return ["python", "-m", ns.training_script, *ns.training_script_args]


def script_parses(words: list[str]) -> None:
    """`python scripts/NAME.py ARGS`: the script exists and its parser takes ARGS."""
    path = REPO / words[1]
    assert words[0].endswith("python") and path.parent == REPO / "scripts" and path.is_file(), shlex.join(words)
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    if hasattr(module, "build_parser"):
        module.build_parser().parse_args(words[2:])
    else:
        assert not words[2:], f"{words[1]} takes no arguments: {shlex.join(words)}"


def tiny_imagenet(root: Path) -> Path:
    """train/ and val/ of the ImageNet-100 classes (so that --subset imagenet100.txt finds them all), 2 and 1
    small JPEGs each: 200 train images, as many as kNN's k."""
    classes = (REPO / "configs" / "imagenet100.txt").read_text().split()
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{c}_{i}.JPEG", quality=90)
    return root


def stand_ins(words: list[str], imagenet: Path, scratch: Path) -> list[str]:
    out = []
    for w in words:
        w = w.replace("/data/imagenet", str(imagenet)).replace("/data/betons", str(scratch / "betons"))
        w = w.replace("epoch_0200.pt", "epoch_0001.pt")
        out.append(w)
    if "--device" in out and not torch.cuda.is_available():
        out[out.index("--device") + 1] = "cpu"
    if "--synthetic-data" in out:
        i = out.index("--synthetic-data") + 1
        out[i] = str(min(int(out[i]), 32))
    return out


def test_the_rule_finds_the_commands():
    text = ("text\n```bash\nfastft-train demo \\\n  optim.epochs=5   # five\n# only a comment\n```\n"
            "\n    fastft-train in1k\n```text\nnot run\n```\n")
    assert readme_commands(text) == ["fastft-train demo optim.epochs=5"]
    assert [line for line in indented_lines(text) if looks_like_command(line)] == ["fastft-train in1k"]
    assert len(readme_commands((REPO / "README.md").read_text())) >= 40


def test_readme_shows_commands_only_in_bash_blocks():
    shown = [line for line in indented_lines((REPO / "README.md").read_text()) if looks_like_command(line)]
    assert not shown, f"commands in indented blocks are not run by the tests; put them in ```bash blocks: {shown}"


def test_torchrun_lines_are_checked():
    assert torchrun_module(shlex.split("A_B=1 torchrun --nnodes=1:4 --nproc_per_node=8 -m fastft.train in1k x=1")) \
        == ["python", "-m", "fastft.train", "in1k", "x=1"]
    with pytest.raises(SystemExit):
        torchrun_module(shlex.split("torchrun --gpus=8 -m fastft.train in1k"))


def test_every_readme_command_runs(tmp_path, data_cache, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    imagenet = tiny_imagenet(tmp_path / "imagenet")
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
        words = torchrun_module(words) or words
        if words[0].endswith("python") and words[1].startswith("scripts/"):
            script_parses(words)
            continue
        found = fastft_module(stand_ins(words, imagenet, tmp_path))
        assert found, f"README: no rule to run {command!r} (tests/test_readme.py)"
        module, args = found
        if module in TAKES_OVERRIDES and "--list-configs" not in args:
            args = [*args, *tiny]
            if IMAGENET_CONFIGS & set(args):
                args += [f"data.path={imagenet}", "data.image_size=32", "optim.epochs=1"]
            if module == "fastft.bench.cli":
                args += BENCH
        if module == "fastft.pipelines.convert_cli":
            if "ffcv" not in available_backends():  # installed without the ffcv extra (make install without root)
                continue
            args = [*args, "--cache-dir", data_cache, "--num-workers", "1"]
        status = importlib.import_module(module).main(args)
        out = capsys.readouterr()
        assert status == 0, f"README command {command!r} (run as {module} {args}): {out.err[-3000:]}"
        ran += 1
    assert ran >= 30
