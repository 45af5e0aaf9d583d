"""One entry point for every loader backend: `LoaderSpec.backend` picks it (spec.py: DataSpec, LoaderSpec)."""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
from pathlib import Path

import torch

from .augment import TwoViews, torchvision_eval_transform, torchvision_linear_transform, torchvision_train_transform
from .bad_images import POLICIES, BadImagePolicy
from .builtin import is_builtin
from .imagefolder import SubsetImageFolder, dataset_root, read_class_list
from .spec import BACKENDS, DataSpec, LoaderSpec, spec_error
from .torchvision_loader import TorchvisionLoader, to_device

_BACKEND_MODULES = {"dali": "nvidia.dali", "ffcv": "ffcv"}


def _class_list(data: DataSpec) -> list[str] | None:
    if data.class_list is None:
        return None
    if not data.class_list.is_file():
        raise spec_error(FileNotFoundError, "class_list", f" {str(data.class_list)!r}: no such file")
    return read_class_list(data.class_list)


def _dataset(data: DataSpec, split: str, transform) -> SubsetImageFolder:
    folder = dataset_root(data.path, data.cache_dir) / split
    if not folder.is_dir():
        raise spec_error(FileNotFoundError, "path", f" {data.path!r}: split folder {folder} does not exist")
    return SubsetImageFolder(folder, _class_list(data), class_list_name=str(data.class_list or ""),
                             transform=transform)


def bad_image_policy(data: DataSpec) -> BadImagePolicy:
    if data.on_bad_image not in POLICIES:
        raise spec_error(ValueError, "on_bad_image", f" {data.on_bad_image!r}: valid: {', '.join(POLICIES)}")
    return BadImagePolicy(data.on_bad_image, data.max_bad_fraction)


def available_backends() -> list[str]:
    """The loader backends installed here (torchvision always; dali and ffcv with their extras)."""
    return [b for b in BACKENDS if b not in _BACKEND_MODULES or importlib.util.find_spec(_BACKEND_MODULES[b])]


def _require(backend: str) -> None:
    if backend not in BACKENDS:
        raise spec_error(ValueError, "backend", f" {backend!r}: valid: {', '.join(BACKENDS)}")
    if backend not in available_backends():
        raise spec_error(ImportError, "backend", f" = {backend!r} needs the {backend} extra: pip install -e "
                                                 f"'.[{backend}]' (`make install` does it); installed here: "
                                                 f"{', '.join(available_backends())}")


def beton_path(data: DataSpec, loader: LoaderSpec, split: str) -> Path:
    """The .beton of `split` for the ffcv backend: `<beton_dir>/<split>.beton`, or for a built-in dataset (and
    no beton_dir) one converted on first use into the data's cache_dir."""
    subset = data.class_list
    if loader.beton_dir is not None:
        path = loader.beton_dir / f"{split}.beton"
        if not path.is_file():
            src = data.path if is_builtin(data.path) else str(Path(data.path) / split)
            hint = f" --subset {subset}" if subset else ""
            raise spec_error(FileNotFoundError, "beton_dir", f" {str(loader.beton_dir)!r}: no {path}; write it "
                                                             f"with `fastft-convert-dataset {src} {path}{hint}`")
        return path
    if not is_builtin(data.path):
        raise spec_error(FileNotFoundError, "beton_dir", f" is not set: the ffcv backend reads .beton files; set "
                                                         f"it to the folder that holds train.beton and val.beton, "
                                                         f"written by `fastft-convert-dataset "
                                                         f"{Path(data.path) / split} DIR/{split}.beton`")
    from .convert import convert

    tag = "-" + hashlib.sha1(subset.read_bytes()).hexdigest()[:10] if subset and subset.is_file() else ""
    cache = dataset_root(data.path, data.cache_dir).parent
    path = cache / f"{data.path.split(':', 1)[1]}-{split}{tag}.beton"
    with open(f"{path}.lock", "w") as lock:  # ranks of one machine convert once, the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path.is_file() and Path(f"{path}.json").is_file()):
            convert(data.path, path, split=split, subset=str(subset) if subset else None, num_workers=1,
                    force=True, cache_dir=data.cache_dir)
    return path


def _check_classes(data: DataSpec, classes: list[str], beton: Path) -> None:
    want = _class_list(data)
    if want is not None and sorted(set(want)) != classes:
        raise spec_error(ValueError, "class_list", f" {str(data.class_list)!r} lists {len(set(want))} classes, "
                                                   f"but {beton} holds {len(classes)} others; convert it with "
                                                   f"--subset {data.class_list}")


def _fast_loader(data: DataSpec, loader: LoaderSpec, split: str, device: torch.device, train: bool, rank: int,
                 world_size: int):
    kw = dict(train=train, aug=loader.aug, image_size=data.image_size, seed=loader.seed, rank=rank,
              world_size=world_size, channels_last=loader.channels_last, eval_crop_ratio=loader.eval_crop_ratio,
              crop_scale_min=loader.crop_scale_min, color_ops=loader.color_ops)
    if loader.backend == "dali":
        from .dali_loader import DALILoader

        return DALILoader(_dataset(data, split, None), loader.batch_size, loader.workers, device,
                          bad_images=bad_image_policy(data), cache_dir=data.cache_dir, **kw)
    if loader.backend == "nvjpeg":
        from .nvjpeg_loader import NvJPEGLoader

        return NvJPEGLoader(_dataset(data, split, None), loader.batch_size, loader.workers, device,
                            bad_images=bad_image_policy(data), **kw)
    from .ffcv_loader import FFCVLoader

    beton = beton_path(data, loader, split)
    ffcv = FFCVLoader(beton, loader.batch_size, loader.workers, device, bad_images=bad_image_policy(data), **kw)
    _check_classes(data, ffcv.dataset.classes, beton)
    return ffcv


def pretrain_loader(data: DataSpec, loader: LoaderSpec, device: torch.device, rank: int = 0,
                    world_size: int = 1):
    """(view1, view2, labels) batches of the train split, two independently augmented views per image."""
    _require(loader.backend)
    if loader.backend != "torchvision":
        return _fast_loader(data, loader, data.train_split, device, True, rank, world_size)
    transform = TwoViews(torchvision_train_transform(loader.aug, data.image_size, loader.crop_scale_min))
    ds = _dataset(data, data.train_split, transform)
    return TorchvisionLoader(ds, loader.batch_size, loader.workers, device, train=True, seed=loader.seed,
                             rank=rank, world_size=world_size, channels_last=loader.channels_last,
                             bad_images=bad_image_policy(data))


def eval_loader(data: DataSpec, loader: LoaderSpec, split: str, device: torch.device):
    """(images, labels) batches of `split` with the evaluation transform, in dataset order."""
    _require(loader.backend)
    if loader.backend != "torchvision":
        return _fast_loader(data, loader, split, device, False, 0, 1)
    transform = torchvision_eval_transform(data.image_size, loader.eval_crop_ratio)
    ds = _dataset(data, split, transform)
    return TorchvisionLoader(ds, loader.batch_size, loader.workers, device, train=False, seed=loader.seed,
                             channels_last=loader.channels_last, bad_images=bad_image_policy(data))


class LabelledLoader(TorchvisionLoader):
    """Shuffled, sharded and epoch-seeded like the pretraining loader, but one view: (images, labels)."""

    def __iter__(self):
        for images, labels in self.batches():
            yield to_device(images, self.device, self.channels_last), labels.to(self.device, non_blocking=True)


def linear_loader(data: DataSpec, loader: LoaderSpec, device: torch.device, rank: int = 0,
                  world_size: int = 1) -> LabelledLoader:
    """(images, labels) batches of the train split for the linear probe: RandomResizedCrop (scale
    (loader.crop_scale_min, 1)) + flip, with loader.batch_size. Always the torchvision backend."""
    transform = torchvision_linear_transform(data.image_size, loader.crop_scale_min)
    ds = _dataset(data, data.train_split, transform)
    return LabelledLoader(ds, loader.batch_size, loader.workers, device, train=True, seed=loader.seed,
                          rank=rank, world_size=world_size, channels_last=loader.channels_last,
                          bad_images=bad_image_policy(data))

