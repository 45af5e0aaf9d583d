"""fastft as a user installs it: a wheel built from this tree, installed into a fresh venv, run from a folder
outside the repository. No network: the venv sees the dependencies already installed beside the test's Python."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from fastft.pipelines.loader import available_backends

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("fastft", "pipelines", "kernels", "configs", "pyproject.toml", "README.md", "LICENSE")
TINY = ["data.image_size=8", "loader.batch_size=16", "loader.workers=0", "model.queue_size=32", "optim.epochs=1",
        "run.steps_per_epoch=2", "run.device=cpu", "run.tensorboard=false", "knn.every=0", "scores.enabled=false"]


def build_wheel(dest: Path) -> Path:
    """`pip wheel` of a copy of the tree (the build writes build/ and *.egg-info beside the sources)."""
    src = dest / "src"
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (REPO / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dest), str(src)], check=True, capture_output=True, timeout=120)
    (wheel,) = dest.glob("fastft-*.whl")
    return wheel


def fresh_venv(dest: Path, wheel: Path) -> Path:
    """A venv with the wheel installed; the test's own site-packages come after its own through a .pth line (a
    plain path: the editable install's hook in there is not run, so `fastft` can only be the wheel's)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True, timeout=60)
    purelib = Path(subprocess.run([str(dest / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(dest / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, timeout=120)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(root)
    return wheel, fresh_venv(root / "venv", wheel)


def test_the_wheel_holds_configs_class_list_readme_and_license(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for packaged in ("fastft/configs/demo.yaml", "fastft/configs/in1k.yaml", "fastft/configs/imagenet100.txt",
                     "fastft/configs/ablations/neg.yaml", "fastft/pipelines/convert_cli.py",
                     "fastft/kernels/infonce_triton.py"):
        assert packaged in names, packaged
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta and "Provides-Extra: ffcv" in meta and "Provides-Extra: dali" in meta
    assert "# fastft" in meta  # README as the long description
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_installed_commands_run_outside_the_repository(installed, tmp_path, data_cache):
    _, venv = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1")

    def cmd(*args: str) -> str:
        proc = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        return proc.stdout + proc.stderr

    tiny = [*TINY, f"data.cache_dir={data_cache}", "run.out_dir=run"]
    assert "epoch 1/1" in cmd("fastft-train", "demo", *tiny)  # a packaged config, by name
    if "ffcv" in available_backends():  # else installed without the ffcv extra (make install without root)
        cmd("fastft-convert-dataset", "builtin:digits", "digits/val.beton", "--split", "val", "--cache-dir",
            data_cache, "--num-workers", "1")
        assert (tmp_path / "digits" / "val.beton").stat().st_size > 0
    assert "kNN top-1 on val" in cmd("fastft-knn", "demo", *tiny)
    out = cmd("fastft-export", "run/checkpoints/epoch_0001.pt", "--format", "torchvision", "r18.pth",
              "--allow-small-stem")
    recipe = out.split("load with: ", 1)[1].strip()
    # The printed recipe loads the file; and every fastft module imported here is the wheel's, not this checkout.
    where = cmd("python", "-c", f"{recipe}; import sys; assert 'fastft' not in sys.modules; "
                                "import fastft.train, fastft.kernels, fastft.pipelines, fastft.configs; "
                                "print(*[m.__file__ for n, m in sys.modules.items() "
                                "if n.split('.')[0] == 'fastft' and getattr(m, '__file__', None)], sep='\\n')")
    files = [Path(line) for line in where.split()]
    assert files and all(f.is_relative_to(venv) for f in files), files
