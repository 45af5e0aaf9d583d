"""One entry point for every loader backend: `loader.backend` in the config picks it."""
from __future__ import annotations

from pathlib import Path

import torch

from fastft.config import Config, resolve_path

from .augment import TwoViews, torchvision_eval_transform, torchvision_train_transform
from .imagefolder import SubsetImageFolder, dataset_root, read_class_list
from .torchvision_loader import TorchvisionLoader


def _dataset(cfg: Config, split: str, transform) -> SubsetImageFolder:
    root = dataset_root(cfg.data.path, cfg.data.cache_dir)
    classes, name = None, ""
    if cfg.data.class_list:
        path = resolve_path(cfg, cfg.data.class_list)
        if not path.is_file():
            raise FileNotFoundError(f"data.class_list {cfg.data.class_list!r}: no such file "
                                    f"(looked beside {cfg.source or 'the working directory'})")
        classes, name = read_class_list(path), str(path)
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path {cfg.data.path!r}: split folder {folder} does not exist")
    return SubsetImageFolder(folder, classes, class_list_name=name, transform=transform)


def pretrain_loader(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> TorchvisionLoader:
    """(view1, view2, labels) batches of the train split, two independently augmented views per image."""
    transform = TwoViews(torchvision_train_transform(cfg.loader.aug, cfg.data.image_size))
    ds = _dataset(cfg, cfg.data.train_split, transform)
    return TorchvisionLoader(ds, cfg.loader.batch_size, cfg.loader.workers, device, train=True, seed=cfg.run.seed,
                             rank=rank, world_size=world_size, channels_last=cfg.run.channels_last)


def eval_loader(cfg: Config, split: str, device: torch.device) -> TorchvisionLoader:
    """(images, labels) batches of `split` with the evaluation transform, in dataset order."""
    transform = torchvision_eval_transform(cfg.data.image_size, cfg.loader.eval_crop_ratio)
    ds = _dataset(cfg, split, transform)
    return TorchvisionLoader(ds, cfg.loader.batch_size, cfg.loader.workers, device, train=False,
                             seed=cfg.run.seed, channels_last=cfg.run.channels_last)
