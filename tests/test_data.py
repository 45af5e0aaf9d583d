"""The built-in digits, the reference two-view loader, and the config -> spec -> loader path (fastft/data.py)."""
import collections
import typing

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from fastft.config import ConfigError, LoaderConfig, load_config
from fastft.data import data_spec, eval_loader, linear_loader, loader_spec, pretrain_loader
from fastft.pipelines import loader as loaders
from fastft.pipelines.augment import AUG_SPECS, IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size
from fastft.pipelines.builtin import digits_arrays, digits_split, materialize
from fastft.pipelines.imagefolder import load_rgb
from fastft.pipelines.spec import COLOR_OPS, DataSpec, LoaderSpec, color_executor


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
    cfg = load_config(cfgfile, tiny_overrides(tmp_path / "out", data_cache) + ["data.class_list=missing.txt"])
    with pytest.raises(FileNotFoundError, match=f"data.class_list 'missing.txt': no such file .*{cfgfile}"):
        eval_loader(cfg, "val", torch.device("cpu"))


def test_corrupt_image_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(RuntimeError, match="cannot decode image .*broken.png"):
        load_rgb(str(bad))


def test_missing_data_folder_is_a_clear_error(tmp_path, data_cache):
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache, **{"data.path": str(tmp_path / "nowhere")}))
    with pytest.raises(FileNotFoundError, match="^data.path '.*nowhere': no such folder"):
        pretrain_loader(cfg, torch.device("cpu"))
    # Used directly, the pipelines name the spec field (and say which it is); fastft.data names the config key.
    with pytest.raises(FileNotFoundError, match="^path '.*nowhere': no such folder") as err:
        loaders.pretrain_loader(DataSpec(path=str(tmp_path / "nowhere")), LoaderSpec(), torch.device("cpu"))
    assert err.value.spec_field == "path"
    (tmp_path / "data" / "val").mkdir(parents=True)
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache, **{"data.path": str(tmp_path / "data")}))
    with pytest.raises(FileNotFoundError, match="^data.path '.*data': split folder .*train does not exist"):
        pretrain_loader(cfg, torch.device("cpu"))


def test_specs_come_from_the_config_with_paths_beside_it(tmp_path, data_cache):
    (tmp_path / "few.txt").write_text("3\n7\n")
    (tmp_path / "betons").mkdir()
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("data:\n  class_list: few.txt\nloader:\n  beton_dir: betons\n  color_ops: torch\n")
    cfg = load_config(cfgfile, tiny_overrides(tmp_path / "out", data_cache, **{"run.seed": 5}))
    assert data_spec(cfg) == DataSpec(path="builtin:digits", class_list=tmp_path / "few.txt", image_size=8,
                                      cache_dir=data_cache)
    assert loader_spec(cfg) == LoaderSpec(batch_size=16, workers=0, beton_dir=tmp_path / "betons",
                                          color_ops="torch", seed=5)
    assert loader_spec(cfg, batch_size=3).batch_size == 3


def test_linear_loader_takes_batch_and_crop_scale_from_the_linear_section(tmp_path, data_cache):
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache, **{"linear.batch_size": 32,
                                                                     "linear.crop_scale_min": 0.5}))
    loader = linear_loader(cfg, torch.device("cpu"))
    assert loader.batch_size == 32 and len(loader) == 1437 // 32
    assert loader.dataset.transform.transforms[0].scale == (0.5, 1.0)
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 8, 8) and y.shape == (32,)
    # A spec's crop_scale_min 0 is the probe recipe's own (MoCo's main_lincls: 0.08).
    ds = loaders.linear_loader(data_spec(cfg), LoaderSpec(), torch.device("cpu")).dataset
    assert ds.transform.transforms[0].scale == (0.08, 1.0)


def test_color_ops_auto_is_numba_on_the_cpu_and_torch_on_cuda():
    numba = pytest.importorskip("numba")
    assert numba is not None and color_executor("auto", torch.device("cpu")) == "numba"
    assert color_executor("auto", torch.device("cuda")) == "torch"  # a device object: no GPU needed
    assert color_executor("auto", torch.device("cuda", 1)) == "torch"
    for chosen in ("numba", "torch"):
        assert color_executor(chosen, torch.device("cpu")) == color_executor(chosen, torch.device("cuda")) == chosen
    with pytest.raises(ValueError, match="color_ops 'loader': valid: auto, numba, torch"):
        color_executor("loader", torch.device("cpu"))


def test_color_ops_has_one_vocabulary_and_old_values_are_refused(tmp_path, data_cache):
    field = typing.get_type_hints(LoaderConfig)["color_ops"]
    assert typing.get_args(field) == COLOR_OPS
    for old in ("loader", "device", "graph"):
        with pytest.raises(ConfigError, match=f"loader.color_ops = '{old}' is not valid; "
                                              f"expected one of 'auto', 'numba', 'torch'"):
            load_config(None, [f"loader.color_ops={old}"])


def test_aug_specs_are_the_moco_recipes():
    v1, v2 = AUG_SPECS["mocov1"], AUG_SPECS["mocov2"]
    # The authors' order (their "A"): jitter before grayscale, which does not commute with it.
    assert [s.name for s in v1] == ["random_resized_crop", "color_jitter", "grayscale", "horizontal_flip"]
    assert [s.name for s in v2] == ["random_resized_crop", "color_jitter", "grayscale", "gaussian_blur",
                                    "horizontal_flip"]
    assert v2[0].params["scale"] == (0.2, 1.0) and v2[1].p == 0.8 and v2[1].params["hue"] == 0.1
    assert v1[1].p == 1.0 and v1[1].params["hue"] == 0.4 and v1[2].p == 0.2 and v2[3].p == 0.5 and v2[3].params["sigma"] == (0.1, 2.0)
    # +-3 sigma of the largest sigma at any size (PIL's blur is not truncated to a share of the image), capped so
    # that reflect padding fits the image.
    assert blur_kernel_size(224) == blur_kernel_size(16) == 13 and blur_kernel_size(4) == 7
    from fastft.pipelines.augment import PILGaussianBlur, _torchvision_step
    ref = _torchvision_step(v2[3], 224)  # the reference is MoCo's own blur: PIL, radius = sigma
    assert ref.p == 0.5 and isinstance(ref.transforms[0], PILGaussianBlur) and ref.transforms[0].sigma == (0.1, 2.0)
    # cifar: MoCo v2 without the blur (FAIR's CIFAR-10 demo), in every backend since they all read the spec.
    assert AUG_SPECS["cifar"] == tuple(s for s in v2 if s.name != "gaussian_blur")
    from fastft.pipelines.augment import torchvision_train_transform
    assert not any(isinstance(t, PILGaussianBlur) or any(isinstance(u, PILGaussianBlur) for u in getattr(t, "transforms", ()))
                   for t in torchvision_train_transform("cifar", 16).transforms)


@pytest.mark.parametrize("content,why", [(b"# only a comment\n", "lists no class"),
                                         (b"n01440764\n\xff\xfe\n", "not UTF-8 text")])
def test_a_bad_class_list_is_one_line_and_exit_2(tmp_path, data_cache, capsys, content, why):
    from fastft import train

    (tmp_path / "classes.txt").write_bytes(content)
    argv = ["configs/demo.yaml"] + tiny_overrides(tmp_path, data_cache, **{"data.class_list": tmp_path / "classes.txt"})
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"fastft-train: error: data.class_list '{tmp_path / 'classes.txt'}': {why}"), err
