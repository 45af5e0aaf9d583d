"""Export the query backbone for other tools: `fastft-export CKPT --format torchvision|detectron2 OUT`.

torchvision: the backbone's state dict under torchvision.models.resnetXX names, without `fc.*` (the MoCo head
is not part of it). It loads strictly once the model's classifier is removed:

    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load("r50.pth"), strict=True)

detectron2: the pickle MoCo's detection/convert-pretrain-to-detectron2.py writes, for the VOC/COCO transfer:
{"model": {detectron2 name: numpy array}, "__author__": ..., "matching_heuristics": True}. detectron2 picks
its reader by the file name, so OUT must end in .pkl.

A small-stem backbone (model.small_stem: 3x3 stride-1 conv1, no max-pool) fits neither format's stem;
--allow-small-stem exports it in the torchvision format as {"arch", "small_stem", "stem", "state_dict"}, so the
file says which model it needs, and prints the torchvision code that builds that model and loads it.
"""
from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

import torch

from . import cli
from .atomic import write_atomic
from .checkpoint import CheckpointError
from .encoder import build_backbone
from .pretrained import BackboneInfo, read_backbone

FORMATS = ("torchvision", "detectron2")
# fastft.encoder.build_backbone's small stem, as torchvision code (the loading recipe builds it).
SMALL_STEM = "torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)"
_STAGE = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")
_BN = re.compile(r"^bn(\d)\.(.+)$")


def detectron2_name(name: str) -> str:
    """torchvision ResNet key -> detectron2 ResNet key.

    conv1 / bn1 -> stem.conv1 / stem.conv1.norm; layer1..4 -> res2..5; inside a block bnN -> convN.norm,
    downsample.0 -> shortcut, downsample.1 -> shortcut.norm.
    """
    stage = _STAGE.match(name)
    prefix, rest = (f"res{int(stage.group(1)) + 1}.{stage.group(2)}.", stage.group(3)) if stage else ("stem.", name)
    if bn := _BN.match(rest):
        rest = f"conv{bn.group(1)}.norm.{bn.group(2)}"
    elif rest.startswith("downsample.0."):
        rest = "shortcut." + rest.removeprefix("downsample.0.")
    elif rest.startswith("downsample.1."):
        rest = "shortcut.norm." + rest.removeprefix("downsample.1.")
    elif not re.match(r"^conv\d\.weight$", rest):
        raise ValueError(f"no detectron2 name for ResNet key {name!r}")
    if not stage and not rest.startswith("conv1."):
        raise ValueError(f"no detectron2 name for ResNet key {name!r}")
    return prefix + rest


def to_detectron2(state: dict[str, torch.Tensor]) -> dict:
    """detectron2's model-zoo pickle. BatchNorm's num_batches_tracked is left out: detectron2 has no such buffer."""
    model = {detectron2_name(k): v.detach().cpu().float().contiguous().numpy()
             for k, v in state.items() if not k.endswith("num_batches_tracked")}
    # matching_heuristics: detectron2 aligns names by suffix (res2.0.conv1 -> backbone.bottom_up.res2.0.conv1).
    return {"model": model, "__author__": "fastft", "matching_heuristics": True}


def to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # contiguous: channels-last training leaves conv weights with permuted strides; a plain layout is friendlier.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def small_stem_file(state: dict[str, torch.Tensor], arch: str) -> dict:
    """The small-stem torchvision export: the state dict with what model it belongs to (a bare state dict could not
    say, and torchvision's own stem does not fit it)."""
    return {"arch": arch, "small_stem": True, "stem": SMALL_STEM, "state_dict": to_torchvision(state)}


def loading_recipe(info: BackboneInfo, fmt: str, out: str | Path) -> str:
    """One line of Python (torch and torchvision only) that builds `model` and loads export `out` into it."""
    if fmt == "detectron2":
        return ("use as MODEL.WEIGHTS in a detectron2 config (INPUT.FORMAT RGB, ImageNet PIXEL_MEAN/STD, "
                "RESNETS.STRIDE_IN_1X1 False, as MoCo's detection configs)")
    build = f"import torch, torchvision; model = torchvision.models.{info.arch}(); "
    if info.small_stem:
        return (build + f"model.conv1 = {SMALL_STEM}; model.maxpool = torch.nn.Identity(); "
                f"model.fc = torch.nn.Identity(); model.load_state_dict(torch.load({str(out)!r})['state_dict'], "
                f"strict=True)")
    return build + f"model.fc = torch.nn.Identity(); model.load_state_dict(torch.load({str(out)!r}), strict=True)"


def check_exportable(info: BackboneInfo, fmt: str, allow_small_stem: bool) -> None:
    if not info.small_stem:
        return
    why = (f"{info.checkpoint} was pretrained with model.small_stem=true (3x3 stride-1 conv1, no max-pool), but "
           f"torchvision's and detectron2's ResNet stems are a 7x7 stride-2 conv1 plus a max-pool")
    if fmt == "detectron2":
        raise CheckpointError(f"{why}: detectron2 cannot load this backbone")
    if not allow_small_stem:
        raise CheckpointError(f"{why}, so torchvision.models.{info.arch}() cannot load it as it is. Pass "
                              f"--allow-small-stem to export it with its stem recorded (the command prints the "
                              f"code that builds the matching model)")


def export(ckpt: str | Path, fmt: str, out: str | Path, allow_small_stem: bool = False) -> BackboneInfo:
    """Write the query backbone of pretraining checkpoint `ckpt` to `out` in format `fmt`, atomically."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "detectron2" and out.suffix != ".pkl":
        raise ValueError(f"{out}: a detectron2 export must end in .pkl (detectron2 reads other files with torch.load)")
    state, info = read_backbone(ckpt)
    check_exportable(info, fmt, allow_small_stem)
    net, _ = build_backbone(info.arch, info.small_stem)
    try:  # what we write must be exactly a torchvision backbone's state
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: the query backbone is not a torchvision {info.arch}: {e}") from e
    if fmt == "torchvision":
        write_atomic(out, small_stem_file(state, info.arch) if info.small_stem else to_torchvision(state))
    else:
        write_atomic(out, to_detectron2(state), dump=pickle.dump)
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = cli.parser("fastft-export", __doc__)
    ap.add_argument("checkpoint", help="a pretraining checkpoint, e.g. runs/in1k/checkpoints/epoch_0200.pt")
    ap.add_argument("--format", required=True, choices=FORMATS,
                    help="torchvision: a state dict for torchvision.models.resnetXX; detectron2: a .pkl for "
                         "MODEL.WEIGHTS")
    ap.add_argument("out", help="output file (.pth for torchvision, .pkl for detectron2)")
    ap.add_argument("--allow-small-stem", action="store_true",
                    help="torchvision format only: export a small-stem backbone (it will not fit torchvision's stem)")
    return ap.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        info = export(args.checkpoint, args.format, args.out, args.allow_small_stem)
        stem = ", small stem (recorded in the file)" if info.small_stem else ""
        how = loading_recipe(info, args.format, args.out)
        print(f"wrote {args.out}: {info.arch} query backbone{stem}, epoch {info.epoch} step {info.step}, "
              f"{args.format} format; " + (f"load with: {how}" if args.format == "torchvision" else how))

    return cli.run("fastft-export", body, errors=(CheckpointError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
