"""Unreadable images (corrupt, truncated, not an image, zero bytes) under both policies of data.on_bad_image, for
pretraining, kNN and the linear probe, on every backend installed here (FFCV: files its converter skipped): skip
finishes with the file named and counted, error exits 2 with one line naming it, never a traceback. And
fastft-check-dataset, which lists them."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_overrides
from fastft import knn_cli, linear, train
from fastft.data import available_backends
from fastft.metrics import read_metrics
from fastft.pipelines import check_cli
from fastft.pipelines.bad_images import BadImageError, BadImagePolicy, BadImages, find_bad

KINDS = ("corrupt", "truncated", "not_an_image", "zero_bytes")


def jpeg(seed: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def bad_bytes(kind: str) -> bytes:
    good = jpeg(99)
    return {"corrupt": good[:200] + bytes(range(256)) * 4 + good[-2:],  # a JPEG header, then garbage
            "truncated": good[:len(good) // 2],
            "not_an_image": b"just text, named .jpg\n",
            "zero_bytes": b""}[kind]


def image_folder(root, kind: str, per_class: int = 8):
    """train/ and val/ with 2 classes of small JPEGs; one bad file of `kind` in train/b. 16 train images read per
    epoch at batch 16 (drop_last): the bad one is always among them."""
    for split in ("train", "val"):
        for c, name in enumerate("ab"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class - (split == "train" and name == "b")):
                (folder / f"{i}.jpg").write_bytes(jpeg(100 * c + i))
    bad = root / "train" / "b" / "bad.jpg"
    bad.write_bytes(bad_bytes(kind))
    return bad


def overrides(tmp_path, data, backend, policy, **extra):
    return tiny_overrides(tmp_path / "run", str(tmp_path / "cache"), **{
        "data.path": str(data), "loader.backend": backend, "data.on_bad_image": policy,
        "data.max_bad_fraction": 0.1, "optim.epochs": 1, "run.steps_per_epoch": 1, **extra})


def one_line_error(err: str, prog: str, bad) -> None:
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error")]
    assert len(lines) == 1 and str(bad) in lines[0], err


BACKENDS = [b for b in ("torchvision", "dali", "nvjpeg") if b in available_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_pretraining_skips_or_stops(tmp_path, capfd, kind, backend):
    bad = image_folder(tmp_path / "data", kind)
    workers = 2 if kind == "corrupt" else 0  # the case: a bad file met in a DataLoader worker
    argv = ["configs/demo.yaml"] + overrides(tmp_path, tmp_path / "data", backend, "error",
                                            **{"loader.workers": workers})
    assert train.main(argv) == 2
    one_line_error(capfd.readouterr().err, "fastft-train", bad)

    assert train.main(argv[:1] + [a.replace("=error", "=skip") for a in argv[1:]]) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count(f"skipping unreadable image {bad}") <= 1
    epoch = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "epoch"]
    assert epoch[-1]["bad_images"] == 1 and epoch[-1]["bad_files"] == [str(bad)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_knn_skips_or_stops(tmp_path, capfd, kind, backend):
    bad = image_folder(tmp_path / "data", kind)
    argv = ["configs/demo.yaml", "--random-init"] + overrides(tmp_path, tmp_path / "data", backend, "error")
    assert knn_cli.main(argv) == 2
    one_line_error(capfd.readouterr().err, "fastft-knn", bad)

    assert knn_cli.main([a.replace("=error", "=skip") for a in argv]) == 0
    out = capfd.readouterr()
    assert "Traceback" not in out.err and "1 unreadable image(s) replaced" in out.out, out


@pytest.mark.parametrize("kind", KINDS)
def test_linear_probe_skips_or_stops(tmp_path, capfd, kind):
    bad = image_folder(tmp_path / "data", kind)
    argv = ["configs/demo.yaml", "--random-init"] + overrides(
        tmp_path, tmp_path / "data", "torchvision", "error",
        **{"linear.epochs": 1, "linear.cache_features": False, "linear.batch_size": 16})
    assert linear.main(argv) == 2
    one_line_error(capfd.readouterr().err, "fastft-linear", bad)

    assert linear.main([a.replace("=error", "=skip") for a in argv]) == 0
    assert "Traceback" not in capfd.readouterr().err
    record = [r for r in read_metrics(tmp_path / "run" / "linear" / "random_init") if r["kind"] == "linear_epoch"]
    assert record[-1]["bad_images"] == 1 and record[-1]["bad_files"] == [str(bad)]


def test_too_many_bad_images_stop_the_run():
    tally = BadImages(BadImagePolicy("skip", max_fraction=0.01), total=200, where="/data/train")
    tally.report("/data/train/a/1.jpg", "OSError: truncated")
    tally.report("/data/train/a/2.jpg", "OSError: truncated")  # 2 of 200 = the limit, not above it
    tally.report("/data/train/a/2.jpg", "OSError: truncated")  # met again: counted, not a new file
    assert tally.take() == (3, ["/data/train/a/1.jpg", "/data/train/a/2.jpg"]) and tally.take() == (0, [])
    with pytest.raises(BadImageError, match=r"3 of the 200 images read from /data/train are unreadable.*"
                                            r"fastft-check-dataset /data/train"):
        tally.report("/data/train/b/3.jpg", "UnidentifiedImageError")


def test_check_dataset_lists_every_unreadable_file(tmp_path, capsys):
    image_folder(tmp_path / "data", "corrupt")
    bads = {kind: tmp_path / "data" / "val" / "a" / f"{kind}.jpg" for kind in KINDS[1:]}
    for kind, path in bads.items():
        path.write_bytes(bad_bytes(kind))
    (tmp_path / "data" / "notes.txt").write_text("not an image extension: not read by the loaders either")
    found = find_bad(sorted(str(p) for p in (tmp_path / "data").rglob("*.jpg")), workers=2)
    expected = sorted([str(tmp_path / "data" / "train" / "b" / "bad.jpg")] + [str(p) for p in bads.values()])
    assert sorted(p for p, _ in found) == expected

    assert check_cli.main([str(tmp_path / "data"), "--json", str(tmp_path / "bad.json")]) == 1
    out = capsys.readouterr().out
    assert all(path in out for path in expected) and "4 of 35 images are unreadable" in out
    assert sorted(r["path"] for r in json.loads((tmp_path / "bad.json").read_text())["unreadable"]) == expected
    for path in expected:
        Path(path).unlink()
    assert check_cli.main([str(tmp_path / "data")]) == 0
    assert check_cli.main([str(tmp_path / "nowhere")]) == 2
    assert "fastft-check-dataset: error:" in capsys.readouterr().err


@pytest.mark.skipif("ffcv" not in available_backends(), reason="the ffcv extra is not installed")
def test_ffcv_holds_files_the_converter_skipped_to_the_policy(tmp_path):
    import torch

    from fastft.pipelines.convert import convert
    from fastft.pipelines.ffcv_loader import FFCVLoader

    bad = image_folder(tmp_path / "data", "truncated")
    beton = tmp_path / "train.beton"
    convert(str(tmp_path / "data" / "train"), beton, num_workers=1, skip_bad=True)
    make = lambda policy, fraction=0.1: FFCVLoader(beton, 8, 1, torch.device("cpu"), train=False, image_size=8,
                                                   bad_images=BadImagePolicy(policy, fraction))
    with pytest.raises(BadImageError, match=f"unreadable image {bad} "):
        make("error")
    loader = make("skip")
    batches = list(loader)  # the whole epoch: an ffcv epoch left half-read complains from its threads
    assert [b[0].shape for b in batches] == [(8, 3, 8, 8), (7, 3, 8, 8)] and loader.bad.take() == (1, [str(bad)])
    with pytest.raises(BadImageError, match="1 of the 16 images read"):
        next(iter(make("skip", 0.01)))


def test_the_dali_pre_scan_is_remembered_for_the_same_files(tmp_path, monkeypatch):
    from fastft.pipelines import bad_images

    bad = image_folder(tmp_path / "data", "zero_bytes")
    files = sorted(str(p) for p in (tmp_path / "data").rglob("*.jpg"))
    assert bad_images.find_bad_cached(files, 2, tmp_path / "cache") == {str(bad): "UnidentifiedImageError: "
                                                                        f"cannot identify image file {str(bad)!r}"}
    monkeypatch.setattr(bad_images, "find_bad", lambda *a: pytest.fail("decoded again"))
    assert list(bad_images.find_bad_cached(files, 2, tmp_path / "cache")) == [str(bad)]
    bad.write_bytes(jpeg(7))  # mended: the fingerprint changes, the files are checked anew
    monkeypatch.undo()
    assert bad_images.find_bad_cached(files, 2, tmp_path / "cache") == {}
