import pytest

from fastft.config import Config, ConfigError, load_config


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  arch: resnet18\n  momentum: 0.99\noptim:\n  lr: 1\n"))
    assert cfg.model.arch == "resnet18" and cfg.model.momentum == 0.99
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0  # int promoted where a float is due
    assert cfg.ft.alpha_pos == 2.0 and cfg.ft.alpha_neg == 1.6 and cfg.ft.dim_mask == "none"
    assert cfg.ft.postmix_norm is False


def test_overrides_apply_with_yaml_types(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  epochs: 5\n"),
                      ["optim.epochs=7", "ft.pos=none", "run.compile=true", "data.class_list=null"])
    assert cfg.optim.epochs == 7 and cfg.ft.pos == "none" and cfg.run.compile is True and cfg.data.class_list is None


def test_unknown_key_names_key_file_and_closest(tmp_path):
    p = write(tmp_path, "model:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "model.momentun" in msg and str(p) in msg and "model.momentum" in msg


def test_unknown_section_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'.*did you mean 'optim"):
        load_config(write(tmp_path, "optimizer:\n  lr: 0.1\n"))


def test_unknown_override_key_names_the_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, ""), ["optim.epoch=3"])
    assert "optim.epoch=3" in str(e.value) and "optim.epochs" in str(e.value)


def test_wrong_type_names_value_and_range(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "model:\n  momentum: fast\n"))
    msg = str(e.value)
    assert "model.momentum" in msg and "'fast'" in msg and "[0.0, 1.0]" in msg


def test_int_field_rejects_float(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.epochs = 2.5 is not an integer; expected an integer in \[1, inf\)"):
        load_config(write(tmp_path, "optim:\n  epochs: 2.5\n"))


def test_out_of_range_names_value_and_range(tmp_path):
    with pytest.raises(ConfigError, match=r"model.momentum = 1.5 is out of range; valid range is \[0.0, 1.0\]"):
        load_config(write(tmp_path, ""), ["model.momentum=1.5"])
    with pytest.raises(ConfigError, match=r"model.temperature = 0.0 is out of range; valid range is \(0.0, inf\)"):
        load_config(write(tmp_path, "model:\n  temperature: 0\n"))


def test_bad_choice_lists_valid_and_closest(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "ft:\n  pos: extrapolat\n"))
    msg = str(e.value)
    assert "'extrapolat'" in msg and "'none', 'extrapolate', 'interpolate'" in msg and "did you mean 'extrapolate'" in msg


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="loader.workers = True is not an integer"):
        load_config(write(tmp_path, "loader:\n  workers: true\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="model must be a mapping"):
        load_config(write(tmp_path, "model: 3\n"))


def test_a_key_given_twice_is_an_error_naming_both_lines(tmp_path):
    text = "optim:\n  epochs: 3\n  lr: 0.5\nmodel:\n  dim: 64\noptim:\n  lr: 0.03\n"
    with pytest.raises(ConfigError, match=r"c.yaml: key 'optim' appears twice \(lines 1 and 6\)"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice \(lines 2 and 3\)"):
        load_config(write(tmp_path, "optim:\n  lr: 0.5\n  lr: 0.1\n"))


def test_scientific_notation_is_a_number(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 3e-2\n  weight_decay: 1E-4\n"), ["loss.queue_dtype=bf16",
                                                                                    "optim.lr=1e-3"])
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 1e-4
    assert load_config(write(tmp_path, "optim:\n  lr: 2.5e+1\n")).optim.lr == 25.0


def test_config_inputs_that_are_not_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("optim:\n  lr: 0.5 # \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")
    with pytest.raises(ConfigError, match=r"override 'optim.lr=\[': the value is not valid YAML"):
        load_config(None, ["optim.lr=["])


def test_cross_field_checks_run_when_the_config_loads(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"scores.pos_lo = 2.0 must be below scores.pos_hi = 1.0"):
        load_config(None, ["scores.pos_lo=2"])
    with pytest.raises(ConfigError, match=r"scores.neg_lo = 3.0 must be below scores.neg_hi = -3.0"):
        load_config(write(tmp_path, "scores:\n  neg_lo: 3\n  neg_hi: -3\n"))
    from fastft.train import main
    out = tmp_path / "run"
    assert main(["configs/demo.yaml", f"run.out_dir={out}", "scores.neg_hi=-5"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not out.exists()  # nothing written


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(write(tmp_path, ""), ["optim.epochs"])


@pytest.mark.parametrize("name", ["demo", "in100", "in1k", "ablations/mocov2", "ablations/pos", "ablations/neg",
                                  "ablations/both", "ablations/pos_elementwise", "ablations/neg_elementwise"])
def test_shipped_configs_load(name):
    from pathlib import Path
    cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert isinstance(cfg, Config)


def test_shipped_configs_match_the_paper():
    from pathlib import Path
    root = Path(__file__).parent.parent / "configs"
    in1k, in100 = load_config(root / "in1k.yaml"), load_config(root / "in100.yaml")
    assert (in1k.model.arch, in1k.model.head, in1k.model.temperature, in1k.optim.epochs) == ("resnet50", "mlp", 0.2, 200)
    assert (in1k.ft.pos, in1k.ft.neg) == ("extrapolate", "interpolate")
    assert len([c for c in (root / "imagenet100.txt").read_text().split() if c]) == 100
    variants = {n: load_config(root / "ablations" / f"{n}.yaml").ft for n in ("mocov2", "pos", "neg", "both")}
    assert [(v.pos, v.neg) for v in variants.values()] == [
        ("none", "none"), ("extrapolate", "none"), ("none", "interpolate"), ("extrapolate", "interpolate")]


def test_the_in1k_and_in100_configs_are_the_authors_commands():
    """configs/in1k.yaml and in100.yaml against the values their headers cite (the authors' README commands and
    option defaults at commit c53d1be)."""
    from pathlib import Path
    root = Path(__file__).parent.parent / "configs"
    for name, momentum, probe_epochs in (("in1k", 0.999, 100), ("in100", 0.99, 60)):
        c = load_config(root / f"{name}.yaml")
        assert (c.loader.aug, c.model.head, c.model.temperature, c.model.dim, c.model.queue_size) == \
            ("mocov2", "mlp", 0.2, 128, 65536), name
        assert c.model.momentum == momentum and c.loader.batch_size * 8 == 256 and c.optim.lr == 0.03
        assert (c.optim.epochs, c.optim.weight_decay, c.optim.momentum) == (200, 1e-4, 0.9)
        assert (c.optim.schedule, c.optim.lr_floor, c.optim.warmup_epochs) == ("cosine_epoch", 0.001, 0.0)
        assert (c.ft.alpha_pos, c.ft.alpha_neg, c.ft.dist, c.ft.dim_mask, c.ft.postmix_norm) == \
            (2.0, 1.6, "beta", "none", False)
        lin = c.linear
        assert (lin.standardize, lin.lr, lin.schedule, lin.milestones, lin.weight_decay, lin.crop_scale_min) == \
            (False, 30.0, "step", [60, 80], 0.0, 0.2)
        assert lin.epochs == probe_epochs
    assert load_config(root / "in100.yaml").data.class_list == "imagenet100.txt"


def test_the_per_epoch_schedule_is_the_authors_formula():
    """learning/base_trainer.py:67-80: eta_min = lr * 0.1**3; lr_e = eta_min + (lr - eta_min)(1 + cos(pi e / E)) / 2,
    set at the start of epoch e = 1..E."""
    import math
    from fastft.schedule import lr_at
    lr, epochs, per_epoch = 0.03, 200, 7
    eta_min = lr * 0.1 ** 3
    for e in (1, 2, 100, 199, 200):
        want = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * e / epochs)) / 2
        for step in ((e - 1) * per_epoch, e * per_epoch - 1):  # the first and the last step of epoch e
            assert lr_at(step, epochs * per_epoch, 0, lr, "cosine_epoch", 0.001, per_epoch) == pytest.approx(want)
    # fastft's per-step cosine is unchanged: to 0 (or the floor) at the last step.
    assert lr_at(0, 100, 0, 1.0) == 1.0 and lr_at(100, 100, 0, 1.0) == pytest.approx(0.0)
    assert lr_at(100, 100, 0, 1.0, "cosine", 0.001) == pytest.approx(0.001)


def test_the_one_sided_variants_are_the_authors():
    """memory/mem_moco.py:168-182 and 221-232 (--mixnorm_target pos / neg): per-element Beta(beta_alpha = 2.0)
    masks on the positives only (extrapolated) or on the queue only."""
    from pathlib import Path
    root = Path(__file__).parent.parent / "configs" / "ablations"
    pos, neg = (load_config(root / f"{n}_elementwise.yaml").ft for n in ("pos", "neg"))
    assert (pos.pos, pos.neg, pos.dim_mask, pos.alpha_pos, pos.dist) == ("extrapolate", "none", "pos", 2.0, "beta")
    assert (neg.pos, neg.neg, neg.dim_mask, neg.alpha_neg, neg.dist) == ("none", "interpolate", "neg", 2.0, "beta")


def test_packaged_configs_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    from fastft.config import find_config, packaged_configs
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert {"demo", "in1k", "in100", "ablations/neg"} <= set(packaged_configs())
    for name in ("demo", "demo.yaml", "configs/demo.yaml"):
        assert find_config(name) == packaged_configs()["demo"]
    assert load_config("ablations/neg").ft.neg == "interpolate"
    (tmp_path / "demo").mkdir()  # a path that exists wins over the packaged name
    with pytest.raises(ConfigError, match="is a directory"):
        load_config("demo")
    with pytest.raises(ConfigError, match=r"config file nope does not exist.*one of: .*demo, in100, in1k"):
        load_config("nope")


def test_a_copied_config_finds_the_packaged_class_list(tmp_path, monkeypatch):
    from fastft.config import find_config, resolve_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text(find_config("in100").read_text())
    cfg = load_config("mine.yaml")
    found = resolve_path(cfg, cfg.data.class_list)
    assert found.is_file() and found.name == "imagenet100.txt" and found.parent == find_config("in100").parent
    (tmp_path / "imagenet100.txt").write_text("n01\n")  # one beside the config wins
    assert resolve_path(cfg, cfg.data.class_list) == tmp_path / "imagenet100.txt"


def test_print_config_shows_every_key_with_type_range_and_default_and_loads_back(tmp_path, capsys):
    from fastft.config import _all_keys, parse_yaml
    from fastft.train import main
    assert main(["demo", "optim.epochs=3", "--print-config", f"run.out_dir={tmp_path / 'r'}"]) == 0
    text = capsys.readouterr().out
    assert not (tmp_path / "r").exists()  # printing trains nothing
    cfg = load_config("demo", ["optim.epochs=3", f"run.out_dir={tmp_path / 'r'}"])
    assert parse_yaml(text) == cfg.to_dict()  # the printout is a config that loads back to the same
    lines, section = {}, ""
    for line in text.splitlines()[1:]:
        if line.startswith("  "):
            lines[f"{section}.{line.split(':')[0].strip()}"] = line
        else:
            section = line.rstrip(":")
    assert sorted(lines) == sorted(_all_keys(Config))
    assert "# an integer in [1, inf); default 200  (changed)" in lines["optim.epochs"]
    assert "# a number in [0.0, 1.0]; default 0.999  (changed)" in lines["model.momentum"]  # demo sets 0.99
    assert "one of 'torchvision', 'dali', 'ffcv', 'nvjpeg'; default torchvision" in lines["loader.backend"]
    assert "(changed)" not in lines["loader.backend"]


def test_list_configs_and_a_missing_config(capsys):
    from fastft.train import main
    assert main(["--list-configs"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert any(line.startswith("demo ") and "built-in scenes" in line for line in listing)
    assert any(line.startswith("ablations/neg ") for line in listing)
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "required: CONFIG" in capsys.readouterr().err


def test_the_ablation_configs_are_the_demo_with_the_ablations_overrides():
    """configs/ablations/NAME.yaml is what `python -m fastft.ablation` trains as variant NAME of the demo (the
    demo with that variant's overrides): only the run folder may differ."""
    from pathlib import Path

    from fastft.ablation import VARIANTS
    root = Path(__file__).parent.parent / "configs"

    def recipe(path, overrides=()):
        cfg = load_config(path, list(overrides)).to_dict()
        cfg["run"].pop("out_dir")
        return cfg

    files = sorted((root / "ablations").glob("*.yaml"))
    assert [p.stem for p in files] == sorted(VARIANTS)
    for path in files:
        assert recipe(path) == recipe(root / "demo.yaml", VARIANTS[path.stem].overrides), path.name
    assert recipe(root / "ablations" / "both.yaml") == recipe(root / "demo.yaml")  # the demo is the full FT
    assert len({str(recipe(path)["ft"]) for path in files}) == len(files) == 6


def test_fp32_precision_turns_tf32_off_everywhere_and_tf32_turns_it_on():
    """run.precision: fp32 trains in IEEE fp32 as the authors did: cuDNN, matmuls and the fused loss without TF32."""
    import torch

    from fastft.device import loss_tf32, pick_precision

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        cuda = torch.device("cuda")  # only the flags are set: no GPU is needed
        assert pick_precision("fp32", cuda) == torch.float32
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert pick_precision("tf32", cuda) == torch.float32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert pick_precision("auto", cuda) == torch.bfloat16 and pick_precision("auto", torch.device("cpu")) == torch.float32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    assert not loss_tf32("fp32", True) and loss_tf32("tf32", True) and loss_tf32("auto", True)
    assert not loss_tf32("auto", False)
