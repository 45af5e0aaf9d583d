"""fastft-convert-dataset (pipelines/convert_cli.py over pipelines/convert.py): round trips, subsets, errors by
path, atomic output, interrupts."""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import parse_python
from fastft.pipelines import convert_cli
from fastft.pipelines.builtin import digits_arrays, digits_split
from fastft.pipelines.loader import available_backends
from fastft.pipelines.photos import write_photo_folder

pytestmark = pytest.mark.skipif("ffcv" not in available_backends(), reason="needs the ffcv extra")


def run(*args: str) -> int:
    from fastft.pipelines.convert_cli import main  # the command, in process (tests only: an entry point)

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photo_folder(tmp_path_factory.mktemp("photos") / "train", 30, size=(120, 90), classes=3)


def stored(beton) -> list[tuple[np.ndarray, int]]:
    from fastft.pipelines.ffcv_loader import read_beton

    return list(read_beton(beton))


def test_round_trip_keeps_every_photo_and_label(photos, tmp_path, capsys):
    out = tmp_path / "p.beton"
    assert run(photos, out, "--num-workers", "2") == 0
    assert "wrote 30 images of 3 classes" in capsys.readouterr().out
    meta = json.loads((tmp_path / "p.beton.json").read_text())
    assert meta["classes"] == ["c0", "c1", "c2"] and len(meta["files"]) == 30 and meta["bad"] == []
    samples = stored(out)
    assert len(samples) == 30
    for (img, label), rel in zip(samples, meta["files"]):
        src = np.asarray(Image.open(photos / rel).convert("RGB")).astype(float)
        assert label == meta["classes"].index(rel.split("/")[0])
        assert img.shape == src.shape  # stored at its own resolution
        assert np.abs(img - src).mean() < 3.0  # re-encoded at JPEG quality 90 (smart mode: photos -> JPEG)


def test_builtin_digits_round_trip_exactly(tmp_path, data_cache, capsys):
    out = tmp_path / "digits" / "val.beton"  # a missing output folder is created
    assert run("builtin:digits", out, "--split", "val", "--cache-dir", data_cache, "--num-workers", "1") == 0
    assert "\r" not in capsys.readouterr().err  # no progress-bar frames where the output is not a terminal
    images, labels = digits_arrays()
    _, val = digits_split(labels)
    meta = json.loads((tmp_path / "digits" / "val.beton.json").read_text())
    samples = stored(out)
    assert len(samples) == len(val) == 360
    for (img, label), rel in zip(samples, meta["files"]):
        i = int(rel.split("/")[-1].split(".")[0])  # the files are named by their index in load_digits()
        assert label == labels[i] == int(meta["classes"][label])
        np.testing.assert_array_equal(img, np.repeat(images[i][..., None], 3, axis=2))  # 8x8 stay raw


def test_subset_keeps_and_relabels_only_the_listed_classes(photos, tmp_path):
    (tmp_path / "few.txt").write_text("# two of three\nc2\nc0\n")
    out = tmp_path / "few.beton"
    assert run(photos, out, "--subset", tmp_path / "few.txt") == 0
    meta = json.loads((tmp_path / "few.beton.json").read_text())
    assert meta["classes"] == ["c0", "c2"]
    labels = [label for _, label in stored(out)]
    assert sorted(set(labels)) == [0, 1] and len(labels) == 20
    (tmp_path / "bad.txt").write_text("c0\nn01440764\n")
    with pytest.raises(Exception, match="have no folder: n01440764"):
        from fastft.pipelines.convert import convert
        convert(str(photos), tmp_path / "x.beton", subset=str(tmp_path / "bad.txt"))


def test_refuses_to_overwrite_without_force(photos, tmp_path, capsys):
    out = tmp_path / "p.beton"
    out.write_bytes(b"precious")
    assert run(photos, out) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert run(photos, out, "--force", "--num-workers", "1") == 0 and out.stat().st_size > 1000


def test_missing_source_and_empty_class_are_named(tmp_path, capsys):
    assert run(tmp_path / "nowhere", tmp_path / "o.beton") == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    root = write_photo_folder(tmp_path / "src", 4, size=(40, 30), classes=2)
    (root / "empty_class").mkdir()
    assert run(root, tmp_path / "o.beton") == 2
    assert f"{root / 'empty_class'}: class folder holds no images" in capsys.readouterr().err
    assert not (tmp_path / "o.beton").exists()
    assert not list(tmp_path.glob("o.beton*"))
    (tmp_path / "file").write_text("")
    assert run(root, tmp_path / "file" / "sub" / "o.beton") == 2
    assert "a parent of it is a file" in capsys.readouterr().err
    assert run(root, tmp_path / "o.beton", "--skip-bad", "--num-workers", "1") == 0
    assert json.loads((tmp_path / "o.beton.json").read_text())["empty_classes"] == ["empty_class"]


def test_unreadable_files_stop_the_conversion_or_are_skipped_and_counted(tmp_path, capsys):
    root = write_photo_folder(tmp_path / "src", 9, size=(60, 45), classes=3)
    (root / "c0" / "notes.jpg").write_text("not an image")
    trunc = root / "c1" / "00004.jpg"
    trunc.write_bytes(trunc.read_bytes()[:300])
    (root / "c2" / "README.txt").write_text("ignored: not an image extension")
    out = tmp_path / "o.beton"
    assert run(root, out, "--num-workers", "2") == 2
    err = capsys.readouterr().err
    assert "2 file(s) are not readable images" in err and "notes.jpg" in err and "00004.jpg" in err
    assert "--skip-bad" in err and not out.exists() and not list(tmp_path.glob("o.beton*"))
    assert run(root, out, "--skip-bad", "--num-workers", "2") == 0
    assert "wrote 8 images of 3 classes" in capsys.readouterr().out  # 10 files with image extensions, 2 bad
    from fastft.pipelines.ffcv_loader import BetonInfo

    info = BetonInfo(out)
    assert len(info) == 8 and {info.files[i].split("/")[-1] for i in info.bad} == {"notes.jpg", "00004.jpg"}


def _default_sigint():  # a shell without job control starts background jobs with SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# Ctrl-C, a job scheduler's kill, and a kill no handler sees
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_conversion_leaves_no_output(tmp_path, sig):
    root = write_photo_folder(tmp_path / "src", 150, size=(500, 375), classes=3)
    out = tmp_path / "o.beton"
    proc = subprocess.Popen([sys.executable, "-m", "fastft.pipelines.convert_cli", str(root), str(out),
                             "--num-workers", "1", "--write-mode", "jpg"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, start_new_session=True)
    deadline = time.time() + 60
    while not (tmp_path / f"o.beton.tmp-{proc.pid}").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be interrupted"
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)  # the conversion and its writer workers, as a job scheduler's kill -9
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:  # no clean-up can run: the next conversion into this folder removes what it left
        assert {p.name.split("-")[0] for p in tmp_path.iterdir()} >= {"o.beton.tmp", ".fastft"}
        assert convert_cli.main([str(root), str(out), "--num-workers", "1", "--write-mode", "jpg"]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["o.beton", "o.beton.json", "src"]
        return
    assert proc.returncode == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no OUT.beton, no .tmp, no sidecar


def test_a_dying_writer_worker_is_an_error_not_a_hang(photos, tmp_path, monkeypatch):
    from fastft.pipelines import convert as conv

    def die(self, i):
        os._exit(3)  # what the kernel's OOM killer leaves behind

    monkeypatch.setattr(conv._Images, "__getitem__", die)
    start = time.time()
    with pytest.raises(conv.ConvertError, match="worker died"):
        conv.convert(str(photos), tmp_path / "o.beton", num_workers=1)
    assert time.time() - start < 30 and not list(tmp_path.glob("o.beton*"))


def test_in_process_conversion_leaves_the_caller_alone(photos, tmp_path):
    """main() inside a longer-lived program (this test runner): an older child of the caller that exited with
    an error is not taken for a dead writer worker, and the caller's signal handlers come back unchanged."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    while os.waitid(os.P_PID, failed.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        time.sleep(0.01)  # exited with status 1, not yet reaped: what the worker watch looks for
    try:
        assert run(photos, tmp_path / "o.beton", "--num-workers", "1") == 0
        time.sleep(0.5)  # a watch left running would interrupt this sleep
    finally:
        failed.wait()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_the_command_module_is_imported_by_no_module():
    """The console script's module is an entry point: code uses the conversion (convert.py), never the CLI."""
    root = Path(__file__).resolve().parents[1]
    for path in sorted([*root.glob("pipelines/*.py"), *root.glob("fastft/*.py"), *root.glob("kernels/*.py")]):
        imported = set()
        for node in ast.walk(parse_python(path)):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported |= {node.module or ""} | {f"{node.module or ''}.{a.name}" for a in node.names}
        assert not any(name.split(".")[-1] == "convert_cli" for name in imported), f"{path} imports it"
    assert "fastft.pipelines.convert_cli:main" in (root / "pyproject.toml").read_text()
