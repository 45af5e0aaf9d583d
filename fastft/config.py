"""Typed run configuration: YAML files loaded into dataclasses, with `key.sub=value` overrides.

Every field declares its type; numeric fields may declare a valid range and string fields their choices
(through `Literal`). Anything else in the YAML is an error that names the key, the file and the closest
valid key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid Config."""


def bounded(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> Any:
    """A numeric field whose value must lie in [lo, hi] (or open at either end)."""
    return field(default=default, metadata={"range": (lo, hi, lo_open, hi_open)})


@dataclass
class DataConfig:
    # An ImageFolder root holding train/ and val/ sub-folders, or "builtin:digits".
    path: str = "builtin:digits"
    train_split: str = "train"
    val_split: str = "val"
    # Optional file of class folder names to keep (e.g. configs/imagenet100.txt); relative to the config file.
    class_list: Optional[str] = None
    image_size: int = bounded(224, 8, 4096)
    # Where built-in datasets are materialised as ImageFolder trees.
    cache_dir: str = "~/.cache/fastft"


@dataclass
class LoaderConfig:
    backend: Literal["torchvision"] = "torchvision"
    batch_size: int = bounded(256, 1)  # per process
    workers: int = bounded(8, 0, 256)
    aug: Literal["mocov1", "mocov2"] = "mocov2"
    # Resize ratio for evaluation transforms: Resize(size / crop_ratio) then CenterCrop(size), as 256/224.
    eval_crop_ratio: float = bounded(0.875, 0.0, 1.0, lo_open=True)


@dataclass
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet50"
    # 3x3 stride-1 first conv and no max-pool, for small images (CIFAR-style).
    small_stem: bool = False
    head: Literal["linear", "mlp"] = "mlp"  # MoCo v1: linear, v2: mlp
    dim: int = bounded(128, 1)
    mlp_hidden: int = bounded(0, 0)  # 0 = backbone width, as MoCo v2 (2048 for ResNet-50)
    queue_size: int = bounded(65536, 1)
    momentum: float = bounded(0.999, 0.0, 1.0)
    temperature: float = bounded(0.2, 0.0, None, lo_open=True)


@dataclass
class FTConfig:
    """Feature Transformation (DESIGN.md section 1). Defaults are the authors'."""
    pos: Literal["none", "extrapolate", "interpolate"] = "extrapolate"
    neg: Literal["none", "interpolate"] = "interpolate"
    alpha_pos: float = bounded(2.0, 0.0, None, lo_open=True)
    alpha_neg: float = bounded(1.6, 0.0, None, lo_open=True)
    dist: Literal["beta", "uniform"] = "beta"
    # none: one scalar lambda per step (the authors' default); elementwise: one per feature element.
    dim_mask: Literal["none", "elementwise"] = "none"
    postmix_norm: bool = False
    start_epoch: int = bounded(0, 0)


@dataclass
class LossConfig:
    kernel: Literal["auto", "torch"] = "auto"


@dataclass
class OptimConfig:
    epochs: int = bounded(200, 1)
    lr: float = bounded(0.03, 0.0, None, lo_open=True)  # per `lr_batch` images; scaled linearly
    lr_batch: int = bounded(256, 1)
    momentum: float = bounded(0.9, 0.0, 1.0)
    weight_decay: float = bounded(1e-4, 0.0)
    warmup_epochs: float = bounded(0.0, 0.0)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class KnnConfig:
    every: int = bounded(10, 0)  # epochs between kNN evaluations on the val split; 0 = never
    k: int = bounded(200, 1)
    temperature: float = bounded(0.07, 0.0, None, lo_open=True)
    # Also report kNN on raw pixels: a floor that shows what the encoder adds (cheap on small data only).
    pixels: bool = False


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = bounded(0, 0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    log_every: int = bounded(20, 1)  # steps between progress/metrics lines (each costs one host sync)
    steps_per_epoch: int = bounded(0, 0)  # 0 = the whole dataset; otherwise truncate epochs (smoke tests)
    ckpt_every: int = bounded(1, 1)  # epochs between checkpoints (the last epoch always saves)
    keep_ckpts: int = bounded(2, 1)
    resume: str = "auto"  # auto | none | path to a checkpoint
    epochs_per_job: int = bounded(0, 0)  # stop after this many epochs (time-limited job slots); 0 = no limit
    progress: bool = True
    tensorboard: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ft: FTConfig = field(default_factory=FTConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # The file it came from, so relative paths in it (class_list) resolve against it. Not a config key.
    source: str = field(default="", metadata={"internal": True})

    def to_dict(self) -> dict:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in _public_fields(self)}


def _public_fields(obj: Any) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(obj) if not f.metadata.get("internal")]


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys.extend(_all_keys(t, f"{prefix}{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def _describe(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(t) if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(t, str(t))


def _range_text(rng: tuple) -> str:
    lo, hi, lo_open, hi_open = rng
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def _coerce(value: Any, t: Any, key: str, where: str, rng: tuple | None) -> Any:
    """Check `value` against type `t` (and range), returning it converted (int -> float where a float is due)."""
    def fail(why: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {value!r} {why}")

    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(t):
            return None
        inner = [a for a in typing.get_args(t) if a is not type(None)]
        return _coerce(value, inner[0], key, where, rng)
    if origin is Literal:
        choices = typing.get_args(t)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise fail(f"is not valid; expected {_describe(t)}{hint}")
        return value
    if t is bool:
        if not isinstance(value, bool):
            raise fail("is not true or false")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"is not an integer; expected an integer in {_range_text(rng) if rng else '(-inf, inf)'}")
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"is not a number; expected a number in {_range_text(rng) if rng else '(-inf, inf)'}")
        value = float(value)
        if not math.isfinite(value):
            raise fail("is not a finite number")
    elif t is str:
        if not isinstance(value, str):
            raise fail("is not a string")
        return value
    if rng is not None:
        lo, hi, lo_open, hi_open = rng
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            raise fail(f"is out of range; valid range is {_range_text(rng)}")
    return value


def _build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the top level'} must be a mapping of keys, "
                          f"got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _public_fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise unknown_key(key, where)
        t, f = hints[name], fields[name]
        if dataclasses.is_dataclass(t):
            kwargs[name] = _build(t, value if value is not None else {}, key + ".", where)
        else:
            kwargs[name] = _coerce(value, t, key, where, f.metadata.get("range"))
    return cls(**kwargs)


def unknown_key(key: str, where: str) -> ConfigError:
    valid = _all_keys(Config)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # try the last component alone: `model.momentun` vs `model.momentum`, `momentum` alone
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [v.rsplit(".", 1)[-1] for v in valid], n=1, cutoff=0.6)][:1]
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid sections are {', '.join(f.name for f in _public_fields(Config))}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. optim.epochs=10)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    # YAML parsing gives `10` -> int, `0.5` -> float, `true` -> bool, `null` -> None, like the file itself.
    return key, yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `key.sub=value` overrides."""
    raw: dict = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {where} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML: {e}") from None
    cfg = _build(Config, raw, "", where)  # file errors are reported against the file
    for text in overrides:
        key, value = parse_override(text)
        tree = cfg.to_dict()
        _set_dotted(tree, key, value)
        cfg = _build(Config, tree, "", f"override {text!r}")
    cfg.source = str(Path(path).resolve()) if path is not None else ""
    return cfg


def resolve_path(cfg: Config, value: str) -> Path:
    """A path from the config: `~` expanded, relative ones taken from the config file's folder if it exists there."""
    p = Path(value).expanduser()
    if not p.is_absolute() and cfg.source:
        beside = Path(cfg.source).parent / p
        if beside.exists():
            return beside
    return p
