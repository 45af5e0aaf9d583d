"""The built-in digits and the reference two-view loader."""
import collections

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from fastft.config import load_config
from fastft.pipelines.augment import AUG_SPECS, IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size
from fastft.pipelines.builtin import digits_arrays, digits_split, materialize
from fastft.pipelines.imagefolder import load_rgb
from fastft.pipelines.loader import eval_loader, pretrain_loader


def test_digits_materialise_once_with_a_stratified_split(data_cache):
    root = materialize("builtin:digits", data_cache)
    files = {s: sorted((root / s).rglob("*.png")) for s in ("train", "val")}
    assert len(files["train"]) + len(files["val"]) == 1797
    assert not {f.name for f in files["train"]} & {f.name for f in files["val"]}
    _, labels = digits_arrays()
    for split, fs in files.items():
        counts = collections.Counter(int(f.parent.name) for f in fs)
        assert sorted(counts) == list(range(10))
        for c, n in counts.items():  # every class keeps its share (stratified), to within one image
            share = (labels == c).sum() * (0.8 if split == "train" else 0.2)
            assert abs(n - share) <= 1
    mtime = (root / "COMPLETE").stat().st_mtime_ns
    assert materialize("builtin:digits", data_cache) == root and (root / "COMPLETE").stat().st_mtime_ns == mtime
    # The files hold the real pixels.
    images, _ = digits_arrays()
    i = int(files["val"][0].stem)
    np.testing.assert_array_equal(np.asarray(load_rgb(str(files["val"][0])))[..., 0], images[i])
    tr, va = digits_split(labels)
    assert len(tr) == len(files["train"]) and (tr == digits_split(labels)[0]).all()


def test_unknown_builtin_is_a_clear_error(data_cache):
    with pytest.raises(ValueError, match="unknown built-in dataset 'builtin:cifar'; valid: builtin:digits"):
        materialize("builtin:cifar", data_cache)


def test_two_view_batches_on_device_channels_last(tmp_path, data_cache):
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache, **{"data.image_size": 16, "loader.workers": 2}))
    loader = pretrain_loader(cfg, torch.device("cpu"))
    assert len(loader) == 1437 // 16
    v1, v2, labels = next(iter(loader))
    assert v1.shape == v2.shape == (16, 3, 16, 16) and v1.dtype == torch.float32 and labels.shape == (16,)
    assert v1.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(v1, v2)  # independently augmented
    # ImageNet normalisation: a white pixel maps to (1 - mean) / std at most.
    assert v1.max() <= max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)) + 1e-5


def test_epoch_order_depends_only_on_seed_and_epoch(tmp_path, data_cache):
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache))
    a, b = pretrain_loader(cfg, torch.device("cpu")), pretrain_loader(cfg, torch.device("cpu"))
    for loader in (a, b):
        loader.set_epoch(3)
    la = torch.cat([y for _, _, y in a])
    torch.manual_seed(123)  # the global RNG does not decide the order
    lb = torch.cat([y for _, _, y in b])
    assert torch.equal(la, lb)
    b.set_epoch(4)
    assert not torch.equal(la, torch.cat([y for _, _, y in b]))


def test_eval_loader_sees_every_val_image_in_order(tmp_path, data_cache):
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache))
    loader = eval_loader(cfg, "val", torch.device("cpu"))
    labels = torch.cat([y for _, y in loader])
    assert len(labels) == 360 and (labels.diff() >= 0).all()


def test_class_list_restricts_and_relabels(tmp_path, data_cache):
    (tmp_path / "few.txt").write_text("# a subset\n7\n3\n")
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("data:\n  class_list: few.txt\n")
    cfg = load_config(cfgfile, tiny_overrides(tmp_path / "out", data_cache))
    ds = eval_loader(cfg, "val", torch.device("cpu")).dataset
    assert ds.classes == ["3", "7"] and set(ds.targets) == {0, 1}
    (tmp_path / "bad.txt").write_text("3\nn01440764\n")
    cfg = load_config(cfgfile, tiny_overrides(tmp_path / "out", data_cache) + ["data.class_list=bad.txt"])
    with pytest.raises(FileNotFoundError, match="bad.txt have no folder: n01440764"):
        eval_loader(cfg, "val", torch.device("cpu"))


def test_corrupt_image_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(RuntimeError, match="cannot decode image .*broken.png"):
        load_rgb(str(bad))


def test_missing_data_folder_is_a_clear_error(tmp_path, data_cache):
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache, **{"data.path": str(tmp_path / "nowhere")}))
    with pytest.raises(FileNotFoundError, match="nowhere.*no such folder"):
        pretrain_loader(cfg, torch.device("cpu"))


def test_aug_specs_are_the_moco_recipes():
    v1, v2 = AUG_SPECS["mocov1"], AUG_SPECS["mocov2"]
    assert [s.name for s in v1] == ["random_resized_crop", "grayscale", "color_jitter", "horizontal_flip"]
    assert [s.name for s in v2] == ["random_resized_crop", "color_jitter", "grayscale", "gaussian_blur",
                                    "horizontal_flip"]
    assert v2[0].params["scale"] == (0.2, 1.0) and v2[1].p == 0.8 and v2[1].params["hue"] == 0.1
    assert v1[2].p == 1.0 and v1[2].params["hue"] == 0.4 and v2[3].p == 0.5 and v2[3].params["sigma"] == (0.1, 2.0)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(16) == 3
