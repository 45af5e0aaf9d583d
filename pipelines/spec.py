"""What a loader needs to know, as two frozen values: the data (DataSpec) and how to load it (LoaderSpec).

The loaders (loader.py) take these and nothing else, so pipelines/ knows nothing about where the values come
from; fastft/data.py builds them from a run's config (resolving its relative paths). Paths in a spec are
final: relative ones are taken from the working directory.

Errors about a spec's value start with the field's name (`beton_dir '/data/b': no /data/b/train.beton; ...`)
and carry it as `spec_field` (`spec_error`), so a caller that took the value from somewhere else can name its
own key instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

BACKENDS = ("torchvision", "dali", "ffcv", "nvjpeg")
# Where the colour steps of the dali, ffcv and nvjpeg backends run (torchvision runs its own PIL transforms):
# numba kernels on the CPU (color_numba.py) or batched torch ops on the training device (batch_augment.py).
COLOR_OPS = ("auto", "numba", "torch")


@dataclass(frozen=True)
class DataSpec:
    # An ImageFolder root holding one folder per split, or "builtin:NAME" (builtin.py).
    path: str = "builtin:digits"
    train_split: str = "train"
    val_split: str = "val"
    # A file of class folder names to keep (imagefolder.read_class_list); None = every class folder.
    class_list: Optional[Path] = None
    image_size: int = 224
    # Where built-in datasets (and the .beton files converted from them) are written.
    cache_dir: str = "~/.cache/fastft"
    # What an unreadable image does (bad_images.py): "skip" (named, replaced, counted) or "error" (stop).
    on_bad_image: str = "skip"
    max_bad_fraction: float = 0.01  # more unreadable images than this share of those read stops the run


@dataclass(frozen=True)
class LoaderSpec:
    backend: str = "torchvision"  # one of BACKENDS
    batch_size: int = 256  # per process
    workers: int = 8  # DataLoader workers, DALI or FFCV threads
    aug: str = "mocov2"  # a recipe of augment.AUG_SPECS
    # RandomResizedCrop's smallest area share; 0 = the recipe's own (0.2 for pretraining, 0.08 for the probe).
    crop_scale_min: float = 0.0
    eval_crop_ratio: float = 0.875  # Resize(size / ratio), then CenterCrop(size)
    # ffcv: the folder of `<split>.beton` files; None = a built-in dataset is converted into cache_dir.
    beton_dir: Optional[Path] = None
    color_ops: str = "auto"  # one of COLOR_OPS, for dali and ffcv (see color_executor)
    seed: int = 0
    channels_last: bool = True


def spec_error(kind: type[Exception], field: str, text: str) -> Exception:
    """kind(field + text), remembering `field` as `spec_field` (see the module doc)."""
    error = kind(field + text)
    error.spec_field = field
    return error


def to_interface(u8: torch.Tensor, executor: str, channels_last: bool = True) -> torch.Tensor:
    """Finished uint8 NHWC views on their device -> the loader interface (normalised float32 NCHW): one numba pass
    for the numba executor's views on the CPU (3x faster there), batch_augment's torch ops otherwise."""
    if executor == "numba" and u8.device.type == "cpu":
        from . import color_numba

        return color_numba.normalize(u8, channels_last)
    from .batch_augment import normalize_uint8_nhwc

    return normalize_uint8_nhwc(u8, channels_last)


def color_executor(color_ops: str, device: torch.device) -> str:
    """Where the colour steps of the dali and ffcv backends run: "numba" or "torch".

    auto: numba on the CPU when it is installed (several times faster there than DALI's CPU operators, and it
    runs in the loader's threads), else torch; torch on a GPU, where the batched ops run on the device.
    """
    from . import color_numba

    if color_ops not in COLOR_OPS:
        raise spec_error(ValueError, "color_ops", f" {color_ops!r}: valid: {', '.join(COLOR_OPS)}")
    if color_ops == "numba" and not color_numba.available():
        raise spec_error(ImportError, "color_ops", " 'numba' needs numba: pip install numba (the dali and ffcv "
                                                   "extras install it)")
    if color_ops != "auto":
        return color_ops
    return "numba" if device.type == "cpu" and color_numba.available() else "torch"
