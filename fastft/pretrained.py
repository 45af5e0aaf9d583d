"""The query backbone of a pretraining checkpoint (or a random-init one) for evaluation and export.

Every reader goes through `read_backbone`, so "not a fastft checkpoint", "not a pretraining checkpoint" and
"another architecture than the config asks" are refused the same way everywhere, naming the file.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint as ckpt_io
from .checkpoint import CheckpointError
from .config import Config, ModelConfig
from .encoder import build_backbone

# Keys of the query backbone inside MoCo's state dict; what follows the prefix is torchvision's name.
BACKBONE_PREFIX = "encoder_q.backbone."


@dataclass(frozen=True)
class BackboneInfo:
    """Which encoder is being evaluated: enough to name it in reports and to tell two apart on resume."""
    kind: str  # "pretrained" | "random_init"
    arch: str
    small_stem: bool
    checkpoint: str = ""  # the pretraining checkpoint ("" at random init)
    epoch: int = 0  # pretraining epochs / steps the weights have seen
    step: int = 0
    fingerprint: str = ""  # sha256 of the weights: the same encoder whatever path it was read from

    @property
    def name(self) -> str:
        """A short folder-safe tag: epoch_0020, random_init."""
        return "random_init" if self.kind == "random_init" else f"epoch_{self.epoch:04d}"

    def describe(self) -> str:
        stem = " (small stem)" if self.small_stem else ""
        if self.kind == "random_init":
            return f"{self.arch}{stem} at random initialisation"
        return f"{self.arch}{stem} pretrained {self.epoch} epoch(s) ({self.checkpoint})"


@dataclass
class Backbone:
    module: nn.Module  # torchvision ResNet with fc = Identity: images -> [N, width] features
    width: int
    info: BackboneInfo


def arch_text(arch: str, small_stem: bool) -> str:
    return f"model.arch={arch} model.small_stem={str(small_stem).lower()}"


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_backbone(path: str | Path, expect: ModelConfig | None = None
                  ) -> tuple[dict[str, torch.Tensor], BackboneInfo]:
    """The query backbone's state dict under torchvision names (no `fc`), and what it is.

    With `expect`, a backbone of another architecture (or stem) than `expect` asks for is refused.
    """
    path = Path(path)
    ckpt = ckpt_io.load(path)  # refuses files that are not fastft checkpoints
    model = ckpt.get("model")
    if not isinstance(model, dict) or not any(k.startswith(BACKBONE_PREFIX) for k in model):
        what = f"a {ckpt['kind']} checkpoint" if "kind" in ckpt else "a checkpoint without model weights"
        raise CheckpointError(f"{path} is {what}, not a pretraining checkpoint: it holds no query backbone "
                              f"({BACKBONE_PREFIX}*). Pass a file from <run.out_dir>/checkpoints/.")
    saved_model = ckpt.get("config", {}).get("model", {})
    arch, small_stem = saved_model.get("arch"), bool(saved_model.get("small_stem", False))
    if expect is not None and (arch, small_stem) != (expect.arch, expect.small_stem):
        raise CheckpointError(f"{path} holds a {arch_text(arch, small_stem)} backbone, but the config asks for "
                              f"{arch_text(expect.arch, expect.small_stem)}: pass the config the encoder was "
                              f"pretrained with, or override those keys to match the checkpoint")
    state = {k[len(BACKBONE_PREFIX):]: v for k, v in model.items() if k.startswith(BACKBONE_PREFIX)}
    info = BackboneInfo("pretrained", arch, small_stem, str(path), int(ckpt.get("epoch", 0)),
                        int(ckpt.get("step", 0)), fingerprint(state))
    return state, info


def load_backbone(path: str | Path, cfg: ModelConfig) -> Backbone:
    """The frozen-ready query backbone of pretraining checkpoint `path`, checked against `cfg`'s architecture."""
    state, info = read_backbone(path, cfg)
    module, width = build_backbone(cfg.arch, cfg.small_stem)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:  # same arch name but other shapes, e.g. a hand-edited file
        raise CheckpointError(f"{path}: the query backbone does not fit {arch_text(cfg.arch, cfg.small_stem)}: "
                              f"{e}") from e
    return Backbone(module, width, info)


def random_backbone(cfg: ModelConfig, seed: int) -> Backbone:
    """The same architecture at random initialisation: the baseline that shows what pretraining added."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream as it was
        torch.manual_seed(seed)
        module, width = build_backbone(cfg.arch, cfg.small_stem)
    info = BackboneInfo("random_init", cfg.arch, cfg.small_stem, fingerprint=fingerprint(module.state_dict()))
    return Backbone(module, width, info)


def pick_backbone(cfg: Config, pretrained: str | None, random_init: bool) -> Backbone:
    """What the evaluation CLIs probe: --random-init, --pretrained CKPT, or the newest checkpoint in run.out_dir."""
    if random_init:
        return random_backbone(cfg.model, cfg.run.seed)
    if pretrained is None:
        found = ckpt_io.newest_good(cfg.run.out_dir)
        if found is None:
            raise CheckpointError(f"no checkpoint in {Path(cfg.run.out_dir) / 'checkpoints'} (run.out_dir); "
                                  f"pass --pretrained CKPT or pretrain first")
        pretrained = str(found[0])
    return load_backbone(pretrained, cfg.model)
