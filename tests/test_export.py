"""fastft-export: torchvision state dicts that load strictly and compute the same features; detectron2 pickles."""
import pickle

import numpy as np
import pytest
import torch
import torchvision

from fastft import checkpoint as ckpt_io
from fastft.atomic import write_atomic
from fastft.config import load_config
from fastft.encoder import build_backbone
from fastft.export import export, main
from fastft.moco import MoCo
from fastft.pretrained import load_backbone


def perturbed(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights and BN statistics unlike any fresh init, so a test cannot pass by comparing two inits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                noise = torch.rand(t.shape, generator=g) if "running_var" in name else torch.randn(t.shape, generator=g)
                t.copy_(0.5 + noise if "running_var" in name else t + 0.05 * noise)
    return net


def write_checkpoint(path, arch: str, small_stem: bool = False, full_moco: bool = False) -> dict:
    """A fastft pretraining checkpoint. full_moco builds the real MoCo state dict; otherwise only the query
    backbone's keys (all that readers use), which keeps a ResNet-50 cheap."""
    cfg = load_config(None, [f"model.arch={arch}", f"model.small_stem={str(small_stem).lower()}",
                             "model.queue_size=8"])
    if full_moco:
        moco = MoCo(cfg.model, cfg.ft)
        perturbed(moco.encoder_q.backbone, 1)
        model = moco.to(memory_format=torch.channels_last).state_dict()  # as training leaves it
    else:
        net, _ = build_backbone(arch, small_stem)
        model = {f"encoder_q.backbone.{k}": v for k, v in perturbed(net, 1).state_dict().items()}
    write_atomic(path, {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "config": cfg.to_dict(),
                        "epoch": 7, "step": 70, "model": model})
    return cfg


def fastft_features(ckpt, cfg, x):
    return load_backbone(ckpt, cfg.model).module.eval()(x)


@pytest.mark.parametrize("arch,full_moco", [("resnet18", True), ("resnet50", False)])
def test_torchvision_export_loads_strictly_and_gives_the_same_features(tmp_path, arch, full_moco):
    ckpt = tmp_path / "ckpt.pt"
    cfg = write_checkpoint(ckpt, arch, full_moco=full_moco)
    out = tmp_path / f"{arch}.pth"
    export(ckpt, "torchvision", out)

    state = torch.load(out, weights_only=True)
    assert not any(k.startswith("fc.") for k in state)
    tv = getattr(torchvision.models, arch)()
    fresh = {k: v.clone() for k, v in tv.state_dict().items()}
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(state, strict=True)  # the README's recipe
    assert not torch.equal(tv.conv1.weight, fresh["conv1.weight"])

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = tv.eval()(x), fastft_features(ckpt, cfg, x)
    assert got.shape == (2, 2048 if arch == "resnet50" else 512)
    torch.testing.assert_close(got, want)


def undo_detectron2_name(name: str) -> str:
    """The inverse mapping, written independently of fastft.export (string rewrites, as MoCo's script does)."""
    name = name.replace("stem.conv1.norm.", "bn1.").replace("stem.", "")
    for i in (2, 3, 4, 5):
        name = name.replace(f"res{i}.", f"layer{i - 1}.")
    name = name.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    for i in (1, 2, 3):
        name = name.replace(f"conv{i}.norm.", f"bn{i}.")
    return name


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_export_names_shapes_and_round_trip(tmp_path, arch):
    ckpt = tmp_path / "ckpt.pt"
    write_checkpoint(ckpt, arch)
    out = tmp_path / "d2.pkl"
    export(ckpt, "detectron2", out)
    with open(out, "rb") as f:
        obj = pickle.load(f, encoding="latin1")  # how detectron2 reads it
    assert obj["__author__"] and obj["matching_heuristics"] is True
    model = obj["model"]
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in model.values())

    wide = arch == "resnet50"
    expect_shapes = {
        "stem.conv1.weight": (64, 3, 7, 7),
        "stem.conv1.norm.running_var": (64,),
        "res2.0.conv1.weight": (64, 64, 1, 1) if wide else (64, 64, 3, 3),
        "res2.0.conv1.norm.weight": (64,),
        "res3.0.shortcut.weight": (512, 256, 1, 1) if wide else (128, 64, 1, 1),
        "res3.0.shortcut.norm.running_mean": (512,) if wide else (128,),
        "res5.1.conv2.norm.bias": (512,),
        "res5.0.conv2.weight": (512, 512, 3, 3),
    }
    if wide:
        expect_shapes.update({"res2.0.conv3.norm.weight": (256,), "res5.2.conv3.weight": (2048, 512, 1, 1),
                              "res4.5.conv1.weight": (256, 1024, 1, 1)})
    for name, shape in expect_shapes.items():
        assert model[name].shape == shape, name
    assert not any("num_batches_tracked" in k or "fc" in k or "layer" in k or "bn" in k for k in model)

    backbone = ckpt_io.load(ckpt)["model"]
    prefix = "encoder_q.backbone."
    weights = {k[len(prefix):]: v for k, v in backbone.items() if not k.endswith("num_batches_tracked")}
    assert len(model) == len(weights)
    for name, value in model.items():
        np.testing.assert_array_equal(value, weights[undo_detectron2_name(name)].numpy(), err_msg=name)


def test_small_stem_is_refused_unless_allowed(tmp_path, capsys):
    ckpt = tmp_path / "small.pt"
    cfg = write_checkpoint(ckpt, "resnet18", small_stem=True)
    assert main([str(ckpt), "--format", "torchvision", str(tmp_path / "a.pth")]) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "small_stem" in err and "--allow-small-stem" in err
    assert not (tmp_path / "a.pth").exists()
    with pytest.raises(ckpt_io.CheckpointError, match="detectron2 cannot load"):
        export(ckpt, "detectron2", tmp_path / "a.pkl")
    # Allowed: the file records the stem, and the recipe the command prints builds the model and loads it.
    out = tmp_path / "a.pth"
    assert main([str(ckpt), "--format", "torchvision", str(out), "--allow-small-stem"]) == 0
    saved = torch.load(out, weights_only=True)
    assert (saved["arch"], saved["small_stem"]) == ("resnet18", True) and "stride=1" in saved["stem"]
    printed = capsys.readouterr().out
    recipe = printed.split("load with: ", 1)[1].strip()
    scope: dict = {}
    exec(recipe, scope)  # the printed line, verbatim: torch and torchvision only
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(x), fastft_features(ckpt, cfg, x))


def test_printed_recipe_loads_a_standard_export(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    cfg = write_checkpoint(ckpt, "resnet18")
    assert main([str(ckpt), "--format", "torchvision", str(tmp_path / "r18.pth")]) == 0
    scope: dict = {}
    exec(capsys.readouterr().out.split("load with: ", 1)[1].strip(), scope)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].eval()(x), fastft_features(ckpt, cfg, x))


def test_non_fastft_files_and_bad_outputs_are_refused(tmp_path, capsys):
    other = tmp_path / "moco_v2_800ep.pth.tar"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}, other)
    assert main([str(other), "--format", "torchvision", str(tmp_path / "x.pth")]) == 2
    assert f"{other} is not a fastft checkpoint" in capsys.readouterr().err

    probe = tmp_path / "probe.pt"  # a fastft checkpoint, but of a linear probe: no encoder inside
    write_atomic(probe, {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "kind": "linear-probe",
                         "head": {}})
    assert main([str(probe), "--format", "torchvision", str(tmp_path / "x.pth")]) == 2
    assert "is a linear-probe checkpoint, not a pretraining checkpoint" in capsys.readouterr().err

    ckpt = tmp_path / "ckpt.pt"
    write_checkpoint(ckpt, "resnet18")
    assert main([str(ckpt), "--format", "detectron2", str(tmp_path / "x.pth")]) == 2
    assert "must end in .pkl" in capsys.readouterr().err
    assert not list(tmp_path.glob("x.*"))
