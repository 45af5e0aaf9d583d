"""One entry point for every loader backend: `loader.backend` in the config picks it."""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
from pathlib import Path

import torch

from fastft.config import Config, resolve_path

from .augment import TwoViews, torchvision_eval_transform, torchvision_linear_transform, torchvision_train_transform
from .imagefolder import SubsetImageFolder, dataset_root, read_class_list
from .torchvision_loader import TorchvisionLoader, to_device


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


BACKENDS = ("torchvision", "dali", "ffcv")
_BACKEND_MODULES = {"dali": "nvidia.dali", "ffcv": "ffcv"}


def available_backends() -> list[str]:
    """The loader backends installed here (torchvision always; dali and ffcv with their extras)."""
    return [b for b in BACKENDS if b not in _BACKEND_MODULES or importlib.util.find_spec(_BACKEND_MODULES[b])]


def _require(backend: str) -> None:
    if backend not in available_backends():
        raise ImportError(f"loader.backend = {backend!r} needs the {backend} extra: pip install -e '.[{backend}]' "
                          f"(`make install` does it); installed here: {', '.join(available_backends())}")


def beton_path(cfg: Config, split: str) -> Path:
    """The .beton of `split` for the ffcv backend: `<loader.beton_dir>/<split>.beton`, or for a built-in dataset
    (and no beton_dir) one converted on first use into data.cache_dir."""
    from .builtin import is_builtin

    subset = resolve_path(cfg, cfg.data.class_list) if cfg.data.class_list else None
    if cfg.loader.beton_dir:
        path = resolve_path(cfg, cfg.loader.beton_dir) / f"{split}.beton"
        if not path.is_file():
            src = cfg.data.path if is_builtin(cfg.data.path) else str(Path(cfg.data.path) / split)
            hint = f" --subset {subset}" if subset else ""
            raise FileNotFoundError(f"loader.beton_dir {cfg.loader.beton_dir!r}: no {path}; write it with "
                                    f"`fastft-convert-dataset {src} {path}{hint}`")
        return path
    if not is_builtin(cfg.data.path):
        raise FileNotFoundError(f"loader.backend = 'ffcv' reads .beton files: set loader.beton_dir to the folder "
                                f"that holds train.beton and val.beton, written by `fastft-convert-dataset "
                                f"{Path(cfg.data.path) / split} DIR/{split}.beton`")
    from .convert import convert

    tag = "-" + hashlib.sha1(subset.read_bytes()).hexdigest()[:10] if subset and subset.is_file() else ""
    cache = Path(dataset_root(cfg.data.path, cfg.data.cache_dir)).parent
    path = cache / f"{cfg.data.path.split(':', 1)[1]}-{split}{tag}.beton"
    with open(f"{path}.lock", "w") as lock:  # ranks of one machine convert once, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path.is_file() and Path(f"{path}.json").is_file()):
            convert(cfg.data.path, path, split=split, subset=str(subset) if subset else None, num_workers=1,
                    force=True, cache_dir=cfg.data.cache_dir)
    return path


def _check_classes(cfg: Config, classes: list[str], beton: Path) -> None:
    if cfg.data.class_list:
        want = sorted(set(read_class_list(resolve_path(cfg, cfg.data.class_list))))
        if want != classes:
            raise ValueError(f"{beton} holds {len(classes)} classes, but data.class_list {cfg.data.class_list!r} "
                             f"lists {len(want)} others; convert it with --subset {cfg.data.class_list}")


def _fast_loader(cfg: Config, split: str, device: torch.device, train: bool, rank: int, world_size: int):
    backend = cfg.loader.backend
    _require(backend)
    kw = dict(train=train, aug=cfg.loader.aug, image_size=cfg.data.image_size, seed=cfg.run.seed, rank=rank,
              world_size=world_size, channels_last=cfg.run.channels_last, eval_crop_ratio=cfg.loader.eval_crop_ratio,
              crop_scale_min=cfg.loader.crop_scale_min)
    if backend == "dali":
        from .dali_loader import DALILoader

        return DALILoader(_dataset(cfg, split, None), cfg.loader.batch_size, cfg.loader.workers, device,
                          color_ops=cfg.loader.color_ops, **kw)
    from .ffcv_loader import FFCVLoader

    beton = beton_path(cfg, split)
    color = {"auto": "auto", "loader": "numba", "device": "torch"}[cfg.loader.color_ops]
    loader = FFCVLoader(beton, cfg.loader.batch_size, cfg.loader.workers, device, color=color, **kw)
    _check_classes(cfg, loader.dataset.classes, beton)
    return loader


def pretrain_loader(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> TorchvisionLoader:
    """(view1, view2, labels) batches of the train split, two independently augmented views per image."""
    if cfg.loader.backend != "torchvision":
        return _fast_loader(cfg, cfg.data.train_split, device, True, rank, world_size)
    transform = TwoViews(torchvision_train_transform(cfg.loader.aug, cfg.data.image_size, cfg.loader.crop_scale_min))
    ds = _dataset(cfg, cfg.data.train_split, transform)
    return TorchvisionLoader(ds, cfg.loader.batch_size, cfg.loader.workers, device, train=True, seed=cfg.run.seed,
                             rank=rank, world_size=world_size, channels_last=cfg.run.channels_last)


def eval_loader(cfg: Config, split: str, device: torch.device) -> TorchvisionLoader:
    """(images, labels) batches of `split` with the evaluation transform, in dataset order."""
    if cfg.loader.backend != "torchvision":
        return _fast_loader(cfg, split, device, False, 0, 1)
    transform = torchvision_eval_transform(cfg.data.image_size, cfg.loader.eval_crop_ratio)
    ds = _dataset(cfg, split, transform)
    return TorchvisionLoader(ds, cfg.loader.batch_size, cfg.loader.workers, device, train=False,
                             seed=cfg.run.seed, channels_last=cfg.run.channels_last)


class LabelledLoader(TorchvisionLoader):
    """Shuffled, sharded and epoch-seeded like the pretraining loader, but one view: (images, labels)."""

    def __iter__(self):
        for images, labels in self._loader():
            yield to_device(images, self.device, self.channels_last), labels.to(self.device, non_blocking=True)


def linear_loader(cfg: Config, device: torch.device, rank: int = 0, world_size: int = 1) -> LabelledLoader:
    """(images, labels) batches of the train split for the linear probe: crop + flip (linear.crop_scale_min)."""
    transform = torchvision_linear_transform(cfg.data.image_size, cfg.linear.crop_scale_min)
    ds = _dataset(cfg, cfg.data.train_split, transform)
    return LabelledLoader(ds, cfg.linear.batch_size, cfg.loader.workers, device, train=True, seed=cfg.run.seed,
                          rank=rank, world_size=world_size, channels_last=cfg.run.channels_last)
