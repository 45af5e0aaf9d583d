"""Split batch norm (`model.key_bn: split`, fastft/split_bn.py): per-group statistics in training, one ordinary
BatchNorm in eval and in the state dict, keys permuted before the key encoder and put back in order after."""
import pytest
import torch
import torch.nn as nn
import torchvision

from conftest import tiny_overrides
from fastft import checkpoint as ckpt_io
from fastft.config import load_config
from fastft.export import export
from fastft.moco import MoCo
from fastft.split_bn import SplitBatchNorm, permute_batch, unpermute_batch
from fastft.train import main as train_main
from fastft.trainer import check_key_bn, train


def random_bn(cls, c: int, seed: int, **kw) -> nn.BatchNorm2d:
    """A batch norm with weights, bias and running statistics unlike a fresh init."""
    g = torch.Generator().manual_seed(seed)
    bn = cls(c, **kw)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


@pytest.mark.parametrize("n,splits,channels_last", [(16, 8, False), (12, 3, True), (10, 2, True), (7, 1, False)])
def test_each_group_is_normalised_as_batch_norm_on_that_chunk_alone(n, splits, channels_last):
    c = 5
    x = torch.randn(n, c, 4, 3) * 3 + torch.randn(1, c, 1, 1)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    split = random_bn(SplitBatchNorm, c, 0, splits=splits).train()
    x1 = x.clone().requires_grad_()
    y = split(x1)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()

    outs, means, vars_ = [], [], []
    x2 = x.clone().requires_grad_()
    for chunk in x2.chunk(splits):
        ref = random_bn(nn.BatchNorm2d, c, 0).train()
        outs.append(ref(chunk))
        means.append(ref.running_mean)
        vars_.append(ref.running_var)
    ref_y = torch.cat(outs)
    (ref_y * torch.arange(ref_y.numel()).view_as(ref_y).sin()).sum().backward()

    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(vars_).mean(0))
    if splits > 1:  # not the whole batch's statistics
        whole = random_bn(nn.BatchNorm2d, c, 0).train()(x)
        assert (whole - y).abs().max() > 1e-3


def test_eval_mode_and_state_dict_are_an_ordinary_batch_norm():
    split = random_bn(SplitBatchNorm, 6, 1, splits=4).eval()
    plain = nn.BatchNorm2d(6)
    plain.load_state_dict(split.state_dict(), strict=True)
    x = torch.randn(8, 6, 3, 3)
    torch.testing.assert_close(split(x), plain.eval()(x))
    assert set(split.state_dict()) == set(plain.state_dict())


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="batch of 10 does not split into 4"):
        SplitBatchNorm(3, splits=4).train()(torch.randn(10, 3, 2, 2))


def test_permutation_is_undone_exactly():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 2, 2).to(memory_format=torch.channels_last)
    shuffled, perm = permute_batch(x)
    assert not torch.equal(perm, torch.arange(32))
    assert torch.equal(unpermute_batch(shuffled, perm), x)


def test_keys_come_back_in_input_order_though_the_key_encoder_saw_them_shuffled(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path)))
    torch.manual_seed(0)
    model = MoCo(cfg.model, cfg.ft)
    assert model.key_bn == "split"  # auto on one process
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SplitBatchNorm) and m.splits == cfg.model.bn_splits == 2 for m in bns)
    seen = []
    model.encoder_k.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    x = torch.randn(16, 3, 8, 8)
    # In eval mode a key depends on its own image only, so the order it was encoded in must not show.
    model.encoder_k.eval()
    keys = model.encode_keys(x)
    expected = torch.nn.functional.normalize(model.encoder_k(x), dim=1)
    torch.testing.assert_close(keys, expected, rtol=0, atol=1e-6)
    order = [int((x == row).all(dim=(1, 2, 3)).nonzero()) for row in seen[0]]
    assert sorted(order) == list(range(16)) and order != list(range(16))
    # In training the groups of keys hold other images than the groups of queries.
    key_groups = {frozenset(order[i:i + 8]) for i in range(0, 16, 8)}
    query_groups = {frozenset(range(i, i + 8)) for i in range(0, 16, 8)}
    assert key_groups != query_groups


def test_a_split_bn_checkpoint_exports_and_loads_strictly_into_torchvision(tmp_path, data_cache):
    cfg = load_config(None, tiny_overrides(tmp_path / "run", data_cache, **{"optim.epochs": 1}))
    train(cfg)
    ckpt = ckpt_io.list_checkpoints(tmp_path / "run")[0]
    state = torch.load(ckpt, weights_only=False)["model"]
    assert state["encoder_q.backbone.bn1.running_var"].ne(1).any()  # statistics that training moved
    out = tmp_path / "r18.pth"
    export(ckpt, "torchvision", out, allow_small_stem=True)
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    net.load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
    assert not any(isinstance(m, SplitBatchNorm) for m in net.modules())
    torch.testing.assert_close(net.bn1.running_var, state["encoder_q.backbone.bn1.running_var"])


def test_bn_splits_that_do_not_divide_the_batch_stop_before_any_data_is_read(tmp_path, capsys):
    args = ["demo", f"run.out_dir={tmp_path / 'run'}", "data.path=/nonexistent/data", "loader.batch_size=12",
            "model.bn_splits=8"]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "model.bn_splits = 8" in err and "loader.batch_size = 12" in err
    assert not (tmp_path / "run").exists()


def test_settings_that_cannot_defend_warn_in_one_line(tmp_path):
    def warnings(world, **kw):
        return check_key_bn(load_config(None, [f"model.{k}={v}" for k, v in kw.items()] + ["loader.batch_size=16"]),
                            world)

    assert warnings(1) == [] and warnings(1, key_bn="split") == [] and warnings(2, key_bn="shuffle") == []
    (w,) = check_key_bn(load_config(None, ["loader.batch_size=16", "data.image_size=8", "model.small_stem=true"]), 1)
    assert "leaves 2 image(s) per group of loader.batch_size = 16" in w and "2 value(s) per channel" in w
    for mode in ("shuffle", "shuffle_gather"):
        (w,) = warnings(1, key_bn=mode)
        assert f"model.key_bn = {mode} does nothing on one process" in w and "split" in w and "\n" not in w
    (w,) = warnings(1, key_bn="split", bn_splits=1)
    assert "bn_splits = 1 is plain batch norm" in w
    (w,) = warnings(2, key_bn="split", bn_splits=1)
    assert "no defence" in w


def test_the_gpu_check_script_runs_its_cpu_twin(capsys):
    """scripts/gpu_check_split_bn.py (gpu_check.sh step 7) on the CPU: its exactness check passes and every
    candidate is timed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check_split_bn.py"
    spec = importlib.util.spec_from_file_location("gpu_check_split_bn", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--device", "cpu", "--arch", "resnet18", "--size", "16", "--batch", "16", "--steps", "1",
                        "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "-> PASS" in out and "| split BN x2 |" in out and "| split BN x8 |" in out and "| plain BN | " in out
