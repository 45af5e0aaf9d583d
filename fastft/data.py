"""The core's one way to the data: a run's Config -> the specs of fastft.pipelines (spec.py) -> its loaders.

fastft.pipelines knows nothing of the config. This module takes the values from it, resolves its relative paths
(data.class_list, loader.beton_dir) against the config file's folder (fastft.config.resolve_path), and names
the config key in errors about a value (the pipelines' errors name the spec field: spec.spec_error).
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Iterator

import torch

from fastft.config import Config, ConfigError, resolve_path
from fastft.pipelines import loader as loaders
from fastft.pipelines.builtin import is_builtin
from fastft.pipelines.imagefolder import dataset_root
from fastft.pipelines.loader import available_backends
from fastft.pipelines.spec import DataSpec, LoaderSpec

# The config key behind each spec field that a pipelines error can be about.
_KEYS = {"path": "data.path", "class_list": "data.class_list", "backend": "loader.backend",
         "beton_dir": "loader.beton_dir", "color_ops": "loader.color_ops", "on_bad_image": "data.on_bad_image"}


def data_spec(cfg: Config) -> DataSpec:
    """cfg.data, with data.class_list resolved (and checked: a missing file is an error naming the key)."""
    class_list = None
    if cfg.data.class_list:
        class_list = resolve_path(cfg, cfg.data.class_list)
        if not class_list.is_file():
            raise FileNotFoundError(f"data.class_list {cfg.data.class_list!r}: no such file "
                                    f"(looked beside {cfg.source or 'the working directory'}, in the working "
                                    f"directory and among the packaged configs)")
    return DataSpec(path=cfg.data.path, train_split=cfg.data.train_split, val_split=cfg.data.val_split,
                    class_list=class_list, image_size=cfg.data.image_size, cache_dir=cfg.data.cache_dir,
                    on_bad_image=cfg.data.on_bad_image, max_bad_fraction=cfg.data.max_bad_fraction)


def loader_spec(cfg: Config, **overrides) -> LoaderSpec:
    """cfg.loader (and run.seed, run.channels_last), loader.beton_dir resolved; `overrides` replace LoaderSpec
    fields (the linear probe's batch_size and crop_scale_min)."""
    spec = LoaderSpec(backend=cfg.loader.backend, batch_size=cfg.loader.batch_size, workers=cfg.loader.workers,
                      aug=cfg.loader.aug, crop_scale_min=cfg.loader.crop_scale_min,
                      eval_crop_ratio=cfg.loader.eval_crop_ratio,
                      beton_dir=resolve_path(cfg, cfg.loader.beton_dir) if cfg.loader.beton_dir else None,
                      color_ops=cfg.loader.color_ops, seed=cfg.run.seed, channels_last=cfg.run.channels_last)
    return dataclasses.replace(spec, **overrides)


@contextmanager
def _config_keys() -> Iterator[None]:
    """A pipelines error about a spec field, raised again naming the config key instead of the field."""
    try:
        yield
    except Exception as e:
        field = getattr(e, "spec_field", None)
        if field not in _KEYS:
            raise
        kind = ConfigError if isinstance(e, ValueError) else type(e)  # a bad value: one line from the commands
        raise kind(_KEYS[field] + str(e).removeprefix(field)).with_traceback(e.__traceback__) from None


def pretrain_loader(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1):
    """(view1, view2, labels) batches of data.train_split from loader.backend (fastft.pipelines.loader)."""
    with _config_keys():
        return loaders.pretrain_loader(data_spec(cfg), loader_spec(cfg), device, rank, world_size)


def eval_loader(cfg: Config, split: str, device: torch.device):
    """(images, labels) batches of `split` with the evaluation transform, in dataset order."""
    with _config_keys():
        return loaders.eval_loader(data_spec(cfg), loader_spec(cfg), split, device)


def linear_loader(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1):
    """(images, labels) batches of data.train_split for the linear probe: crop (linear.crop_scale_min) + flip,
    linear.batch_size per process (or linear.global_batch over all)."""
    spec = loader_spec(cfg, batch_size=cfg.linear.per_process_batch(world_size),
                       crop_scale_min=cfg.linear.crop_scale_min)
    with _config_keys():
        return loaders.linear_loader(data_spec(cfg), spec, device, rank, world_size)


def split_folder(cfg: Config, split: str):
    """The ImageFolder of `split` (a built-in dataset is written on first use): for tools that read it directly."""
    with _config_keys():
        return dataset_root(cfg.data.path, cfg.data.cache_dir) / split


__all__ = ["data_spec", "loader_spec", "pretrain_loader", "eval_loader", "linear_loader", "available_backends",
           "is_builtin", "split_folder"]
