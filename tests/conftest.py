import ast
import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Two cores: keep torch from oversubscribing when DataLoader workers run beside it.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def parse_python(path) -> ast.Module:
    """ast.parse of a source file, with the garbage collector held off: CPython 3.11's parser fails with
    "AST constructor recursion depth mismatch" when a finalizer that raises (numba's, after the FFCV tests) runs
    inside it."""
    gc.disable()
    try:
        return ast.parse(Path(path).read_text())
    finally:
        gc.enable()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One materialised copy of the built-in digits for the whole session."""
    return str(tmp_path_factory.mktemp("fastft-cache"))


def tiny_overrides(out_dir, cache, **extra) -> list[str]:
    """A config small enough for a CPU test: ResNet-18 small stem at 8x8, a few steps per epoch."""
    base = {
        "data.cache_dir": cache, "data.path": "builtin:digits", "data.image_size": 8, "loader.batch_size": 16,
        "loader.workers": 0, "model.arch": "resnet18", "model.small_stem": True, "model.queue_size": 40, "model.momentum": 0.9,
        "model.bn_splits": 2,  # split BN (the default on one process) in groups of 8: 8 values per channel at 1x1
        "optim.epochs": 2, "optim.lr": 0.06, "run.steps_per_epoch": 3, "run.out_dir": str(out_dir),
        "run.device": "cpu", "run.progress": False, "run.tensorboard": False, "knn.every": 0, "run.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_under_interpreter(test_file: str, min_passed: int) -> None:
    """Run `test_file` in a child pytest with TRITON_INTERPRET=1 (the kernels' compiled-or-interpreted mode is
    fixed when they are first imported) and check that it passed and really ran at least `min_passed` tests."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"{out.stdout[-8000:]}\n{out.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", out.stdout.splitlines()[-1])
    assert passed and int(passed.group(1)) >= min_passed, out.stdout[-2000:]
