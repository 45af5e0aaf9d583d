"""scripts/cpu_steps.py, the per-step CPU profile of the loaders (BENCHMARKS.md, "Where the CPU time goes"), on a
few small generated JPEGs: a row per step of every installed backend, each a positive time."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/cpu_steps.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_every_step_has_a_time():
    proc = run("--limit", "6", "--size", "32", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(re.findall(r"^\| (.+?) \| (?:image|view) \| ([0-9.]+) \|$", proc.stdout, re.M))
    want = ["JPEG decode, torchvision", "crop + antialiased resize, torch"]
    if importlib.util.find_spec("nvidia.dali"):
        want += ["JPEG decode, DALI CPU", "crop + antialiased resize, DALI CPU"]
    if importlib.util.find_spec("numba"):
        want += ["colour kernel, no step", "colour kernel, jitter", "colour kernel, blur", "colour kernel, flip",
                 "colour steps of MoCo v2", "normalisation to float32"]
    assert len(rows) == len(want), proc.stdout
    for prefix in want:
        times = [float(ms) for name, ms in rows.items() if name.startswith(prefix)]
        assert len(times) == 1 and times[0] > 0, (prefix, proc.stdout)
    assert "# 6 JPEGs, views 32x32, one thread, medians of 1 passes" in proc.stdout


def test_a_folder_without_jpegs_is_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    proc = run("--images", str(tmp_path))
    assert proc.returncode != 0
    assert f"no .jpg or .jpeg file under {tmp_path}" in proc.stderr


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--limit", "0"], ["--size", "0"]])
def test_counts_must_be_positive(bad):
    proc = run(*bad)
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr
