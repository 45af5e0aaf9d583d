"""Typed run configuration: YAML files loaded into dataclasses, with `key.sub=value` overrides.

Every field declares its type; numeric fields may declare a valid range and string fields their choices
(through `Literal`). Anything else in the YAML is an error that names the key, the file and the closest
valid key, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
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
    """A numeric field whose value must lie in [lo, hi] (or open at either end).

    A list default makes a list field: the range applies to every element, and each Config gets its own copy.
    """
    meta = {"range": (lo, hi, lo_open, hi_open)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


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
    # An unreadable image (corrupt, truncated, not an image, empty): skip = named once in a warning, replaced by
    # the next image that reads, counted in the epoch's record (bad_images); error = stop with one line naming it.
    # More unreadable images than max_bad_fraction of those read stops either way (pipelines/bad_images.py).
    on_bad_image: Literal["skip", "error"] = "skip"
    max_bad_fraction: float = bounded(0.01, 0.0, 1.0)


@dataclass
class LoaderConfig:
    # torchvision: the reference (DataLoader workers). dali: extra `dali`, GPU decode on CUDA, CPU mode without.
    # ffcv: extra `ffcv`, reads .beton files (fastft-convert-dataset). nvjpeg: torch + torchvision only, batched
    # JPEG decode (nvJPEG on CUDA) and crops on the device (pipelines/nvjpeg_loader.py). All yield the same
    # (view1, view2, labels).
    backend: Literal["torchvision", "dali", "ffcv", "nvjpeg"] = "torchvision"
    batch_size: int = bounded(256, 1)  # per process
    workers: int = bounded(8, 0, 256)
    # The augmentation recipe (pipelines/augment.py): mocov1, mocov2 (aug-plus), cifar (mocov2 without the blur,
    # for images of 32 pixels and less, as FAIR's CIFAR-10 MoCo demo).
    aug: Literal["mocov1", "mocov2", "cifar"] = "mocov2"
    # RandomResizedCrop's smallest area share for the pretraining views; 0 = the recipe's own (0.2). Tiny
    # images need more: a 0.2 crop of an 8x8 digit is a 3x3 patch (configs/demo.yaml).
    crop_scale_min: float = bounded(0.0, 0.0, 1.0)
    # Resize ratio for evaluation transforms: Resize(size / crop_ratio) then CenterCrop(size), as 256/224.
    eval_crop_ratio: float = bounded(0.875, 0.0, 1.0, lo_open=True)
    # ffcv: folder of `<split>.beton` files (train.beton, val.beton) written by fastft-convert-dataset, relative
    # to the config file. "" = a built-in dataset is converted on first use into data.cache_dir.
    beton_dir: str = ""
    # dali/ffcv/nvjpeg: the executor of the steps after the crop (jitter, grayscale, blur, flip). numba: kernels on the
    # CPU, in the loader's threads (pipelines/color_numba.py); torch: batched tensor ops on the training device
    # (pipelines/batch_augment.py); auto: numba on the CPU when numba is installed, else torch; torch on a GPU
    # (pipelines/spec.py: color_executor). torchvision, the reference, runs its own PIL transforms: ignored.
    color_ops: Literal["auto", "numba", "torch"] = "auto"


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
    # How batch norm is kept from leaking a batch signature between queries and keys (README, "Multi-GPU and
    # multi-node"; fastft/split_bn.py). split: both encoders normalise `bn_splits` groups of each process's batch
    # separately and the keys are permuted before the key encoder (FAIR's single-GPU MoCo; under DDP combined with
    # the shuffle across ranks). shuffle: MoCo's shuffle-BN by all-to-all (about one local batch of images per
    # rank per step at any world size). shuffle_gather: the same shuffle by all-gather as MoCo's code (W - 1
    # batches; the same keys). sync: SyncBN in both encoders (global-batch statistics, ~160 small all-reduces per
    # step). auto: split on one process, shuffle under DDP. shuffle and shuffle_gather do nothing on one process.
    key_bn: Literal["auto", "split", "shuffle", "shuffle_gather", "sync"] = "auto"
    bn_splits: int = bounded(8, 1)  # groups per process batch for key_bn split; must divide loader.batch_size


@dataclass
class FTConfig:
    """Feature Transformation (fastft/feature_transform.py, docs/design.md section 1). Defaults are the authors'."""
    pos: Literal["none", "extrapolate", "interpolate"] = "extrapolate"
    neg: Literal["none", "interpolate"] = "interpolate"
    alpha_pos: float = bounded(2.0, 0.0, None, lo_open=True)
    alpha_neg: float = bounded(1.6, 0.0, None, lo_open=True)
    dist: Literal["beta", "uniform"] = "beta"
    # Which lambdas are drawn per feature element instead of one scalar per step, as the authors' --dim_mask:
    # none (their default), pos ([N, C] for the positives), neg ([K, C] for the negatives) or both.
    dim_mask: Literal["none", "pos", "neg", "both"] = "none"
    postmix_norm: bool = False
    start_epoch: int = bounded(0, 0)
    # Draw the same scalar lambdas and permutation on every rank (default: each rank its own, as the authors).
    share_lambdas: bool = False

    def __post_init__(self):
        if self.share_lambdas and self.dim_mask != "none":
            raise ConfigError("ft.share_lambdas = true works with scalar lambdas only; set ft.dim_mask = 'none' "
                              "or ft.share_lambdas = false")


@dataclass
class LossConfig:
    # auto: the fused Triton kernel on CUDA, the torch reference elsewhere (fastft/loss.py, kernels/).
    kernel: Literal["auto", "triton", "torch"] = "auto"
    # Storage of the MoCo queue. bf16/fp16 halve the bytes the loss reads per step (the keys are rounded once,
    # when enqueued); the Triton kernel then multiplies in that precision, accumulating in fp32.
    queue_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # The fused kernel on CUDA: fp32 queues multiply on TF32 tensor cores (true, fast) or in full fp32 (false, as
    # the authors' torch code). The torch loss follows torch.backends.cuda.matmul.allow_tf32 (off by default).
    # Off whatever this says under run.precision: fp32.
    tf32: bool = True


@dataclass
class OptimConfig:
    epochs: int = bounded(200, 1)
    lr: float = bounded(0.03, 0.0, None, lo_open=True)  # per `lr_batch` images; scaled linearly
    lr_batch: int = bounded(256, 1)
    momentum: float = bounded(0.9, 0.0, 1.0)
    weight_decay: float = bounded(1e-4, 0.0)
    warmup_epochs: float = bounded(0.0, 0.0)
    # cosine: per step (fastft); cosine_epoch: per epoch, as the authors' code (fastft/schedule.py); constant.
    schedule: Literal["cosine", "cosine_epoch", "constant"] = "cosine"
    lr_floor: float = bounded(0.0, 0.0, 1.0)  # where the cosine ends, as a fraction of the lr (authors: 0.001)


@dataclass
class KnnConfig:
    every: int = bounded(10, 0)  # epochs between kNN evaluations on the val split; 0 = never
    k: int = bounded(200, 1)
    temperature: float = bounded(0.07, 0.0, None, lo_open=True)
    # Also report kNN on the pixels (as the eval transform gives them): the floor that shows what the encoder adds
    # (cheap on small data only).
    pixels: bool = False
    # kNN of the encoder at random initialisation before the first step: the baseline beside the trained number.
    random_init: bool = True


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = bounded(0, 0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast on CUDA, fp32 on CPU. fp32: IEEE fp32 everywhere (no TF32 in cuDNN, matmuls or the loss
    # kernel), as the authors' README command trains; tf32: fp32 on TF32 tensor cores; fp16 uses a GradScaler
    # (fastft/device.py).
    precision: Literal["auto", "fp32", "tf32", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    log_every: int = bounded(20, 1)  # steps between progress/metrics lines (each costs one host sync)
    steps_per_epoch: int = bounded(0, 0)  # 0 = the whole dataset; otherwise truncate epochs (smoke tests)
    ckpt_every: int = bounded(1, 1)  # epochs between checkpoints (the last epoch always saves)
    keep_ckpts: int = bounded(2, 1)
    # auto: the newest checkpoint in out_dir that loads; none: start afresh (earlier checkpoints are moved into
    # checkpoints/earlier/, unreadable ones into checkpoints/unreadable/, never deleted); or a checkpoint's path.
    resume: str = "auto"
    epochs_per_job: int = bounded(0, 0)  # stop after this many epochs (time-limited job slots); 0 = no limit
    progress: bool = True
    tensorboard: bool = True
    # torch's CPU threads in this process (DataLoader workers keep one each); 0 = torch's default (one per core).
    # On a CPU shared with loader workers or other jobs, fewer threads than cores can be faster: torch's OpenMP
    # threads slow down badly when the cores are oversubscribed (BENCHMARKS.md).
    threads: int = bounded(0, 0)


@dataclass
class LinearConfig:
    """Linear evaluation of the frozen query backbone (`fastft-linear`): MoCo's protocol (frozen backbone, one
    linear layer, SGD, 100 epochs, RandomResizedCrop + flip), on standardised features so that it converges for
    any encoder. MoCo's own optimiser settings are `standardize=false lr=30 schedule=step` (README, "Evaluation")."""
    epochs: int = bounded(100, 1)
    batch_size: int = bounded(256, 1)  # per process
    # The batch over all processes instead (each takes global_batch / world size, which must divide): the
    # authors' linear protocol is a total of 16 whatever the GPU count (their --batch_size default, divided by the
    # world size). 0 = batch_size per process.
    global_batch: int = bounded(0, 0)
    # Features standardised by a BatchNorm without affine parameters before the linear layer (synchronised
    # across ranks): the same lr then converges whatever the scale of an encoder's features.
    standardize: bool = True
    lr: float = bounded(0.1, 0.0, None, lo_open=True)  # not scaled with the batch, as MoCo's main_lincls
    momentum: float = bounded(0.9, 0.0, 1.0)
    weight_decay: float = bounded(0.0, 0.0)
    schedule: Literal["cosine", "step"] = "cosine"  # per epoch; step: x lr_decay at each of `milestones`
    milestones: list[int] = bounded([60, 80], 1)  # epochs at which the lr is multiplied by lr_decay (step)
    lr_decay: float = bounded(0.1, 0.0, 1.0, lo_open=True)
    crop_scale_min: float = bounded(0.08, 0.0, 1.0, lo_open=True)  # RandomResizedCrop scale (min, 1)
    # Extract features once with the eval transform (no augmentation) and train on them: much faster, but
    # not the protocol (which augments every epoch). For CPU demos and quick checks.
    cache_features: bool = False
    eval_every: int = bounded(10, 0)  # epochs between val evaluations; 0 = only after the last epoch
    resume: str = "auto"  # auto | none | path to a probe checkpoint
    out_dir: str = ""  # probes go to <out_dir>/<encoder>, e.g. epoch_0020, random_init; "" = <run.out_dir>/linear

    def per_process_batch(self, world: int) -> int:
        """Images per step on each of `world` processes."""
        if not self.global_batch:
            return self.batch_size
        if self.global_batch % world:
            raise ConfigError(f"linear.global_batch = {self.global_batch} does not split over {world} processes; "
                              f"use a multiple of {world}, or linear.global_batch = 0 and linear.batch_size per "
                              f"process")
        return self.global_batch // world


@dataclass
class ScoresConfig:
    """Pos/neg score statistics (fastft/score_stats.py, docs/design.md section 2); logging only, never the training."""
    enabled: bool = True
    # Steps per chunk written to <out_dir>/scores (one column of the density figures; also flushed at each epoch
    # end). 0 = about 10 chunks per epoch, at most 200 steps each.
    flush_every: int = bounded(0, 0)
    # Also record the clean q, k against the stored queue, to see what Feature Transformation changes.
    untransformed: bool = True
    # Per-sample rows as the authors log them (the five numbers of each sample, docs/design.md section 2): the
    # first `samples` samples of every rank's batch at every step, fp16 in the score chunks. 0 = none.
    samples: int = bounded(16, 0)
    # Fixed histogram bins over [lo, hi) (outliers land in the end bins). Scores are q_hat . k_hat and q_hat . n,
    # not divided by T: extrapolated features reach |q_hat| ~ 3 and pos scores 5 cos - 4 at lam_p = 2.
    bins: int = bounded(240, 2, 100000)
    pos_lo: float = -4.0
    pos_hi: float = 1.0
    neg_lo: float = -3.0
    neg_hi: float = 3.0

    def __post_init__(self):
        for kind in ("pos", "neg"):
            lo, hi = getattr(self, f"{kind}_lo"), getattr(self, f"{kind}_hi")
            if not lo < hi:
                raise ConfigError(f"scores.{kind}_lo = {lo} must be below scores.{kind}_hi = {hi}: the histogram of "
                                  f"{kind} scores covers [{kind}_lo, {kind}_hi)")


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
    linear: LinearConfig = field(default_factory=LinearConfig)
    scores: ScoresConfig = field(default_factory=ScoresConfig)
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
    if origin is list:
        return "a list of " + _describe(typing.get_args(t)[0]).removeprefix("a ").removeprefix("an ") + "s"
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
    if origin is list:
        if not isinstance(value, list):
            raise fail(f"is not a list; expected {_describe(t)}, e.g. [60, 80]")
        return [_coerce(v, typing.get_args(t)[0], f"{key}[{i}]", where, rng) for i, v in enumerate(value)]
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
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a check across fields (__post_init__): say where the values came from
        raise ConfigError(f"{where}: {e}") from None


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


class _Loader(yaml.SafeLoader):
    """YAML as users write configs: `1e-3` is a number (YAML 1.1 wants `1.0e-3`), and a key given twice in one
    mapping is an error (YAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice (lines {seen[key]} and {line}); YAML would keep only "
                                  f"the second: merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value (e.g. optim.epochs=10)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    # YAML parsing gives `10` -> int, `0.5` -> float, `true` -> bool, `null` -> None, like the file itself.
    try:
        return key, parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({' '.join(str(e).split())}); quote "
                          f"it to pass text") from None


def packaged_dir() -> Path:
    """The folder of the configs that ship with fastft (configs/ in the repository, fastft/configs when installed)."""
    return Path(str(importlib.resources.files("fastft.configs")))


def packaged_configs() -> dict[str, Path]:
    """Packaged config name -> file: `demo`, `in1k`, `ablations/neg`, ..."""
    root = packaged_dir()
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def find_config(name: str | Path) -> Path:
    """A config file: `name` itself when it exists, else the packaged config of that name (`demo`, `in1k.yaml`,
    `ablations/neg`, also `configs/demo.yaml` from outside the repository); a ConfigError naming both otherwise."""
    p = Path(name)
    if p.exists():
        return p
    packaged = packaged_configs()
    for key in (p.as_posix(), p.with_suffix("").as_posix(), p.with_suffix("").as_posix().removeprefix("configs/")):
        if key in packaged:
            return packaged[key]
    raise ConfigError(f"config file {name} does not exist, and no packaged config has that name; pass a YAML file or "
                      f"one of: {', '.join(packaged)} (fastft-train --list-configs)")


def read_config_file(path: str | Path) -> dict:
    """The YAML mapping in config file `path`, or a ConfigError that names the file and what is wrong."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML file (e.g. configs/demo.yaml)")
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return parse_yaml(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `key.sub=value` overrides. Every check,
    across fields too, runs here: nothing is built or written for a config that is refused."""
    path = find_config(path) if path is not None else None
    raw = read_config_file(path) if path is not None else {}
    where = str(path) if path is not None else "defaults"
    cfg = _build(Config, raw, "", where)  # file errors are reported against the file
    for text in overrides:
        key, value = parse_override(text)
        tree = cfg.to_dict()
        _set_dotted(tree, key, value)
        cfg = _build(Config, tree, "", f"override {text!r}")
    cfg.source = str(Path(path).resolve()) if path is not None else ""
    return cfg


def resolve_path(cfg: Config, value: str) -> Path:
    """A path from the config: `~` expanded; a relative one is taken from the config file's folder if it exists
    there, else from the working directory if it exists there, else from the packaged configs (so a copy of
    in100.yaml still finds imagenet100.txt)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    for base in ([Path(cfg.source).parent] if cfg.source else []) + [Path("."), packaged_dir()]:
        if (base / p).exists():
            return p if base == Path(".") else base / p
    return p


def _flow(value: Any) -> str:
    """One value as YAML on one line."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def describe_config(cfg: Config) -> str:
    """`cfg` as YAML that loads back, every key commented with its type, valid range and default."""
    lines = []
    defaults = Config()
    for section in _public_fields(cfg):
        lines.append(f"{section.name}:")
        node, default_node = getattr(cfg, section.name), getattr(defaults, section.name)
        hints = typing.get_type_hints(type(node))
        for f in _public_fields(node):
            value, default = getattr(node, f.name), getattr(default_node, f.name)
            rng = f.metadata.get("range")
            kind = _describe(hints[f.name]) + (f" in {_range_text(rng)}" if rng else "")
            note = "" if value == default else "  (changed)"
            lines.append(f"  {f.name + ': ' + _flow(value):<38} # {kind}; default {_flow(default)}{note}")
    return "\n".join(lines)
