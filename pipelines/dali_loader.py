"""DALI backend (extra `dali`, nvidia-dali-cuda130): the ImageFolder files, two views from one decode.

One DALI graph per epoch: `fn.readers.file` over this epoch's file list (shuffled by (seed, epoch) like
DistributedSampler and padded so that every rank's shard (`shard_id`, `num_shards`, `pad_last_batch`) holds
ceil(N / world) samples, hence the same number of batches everywhere and the torchvision loader's epoch
length), `fn.decoders.image` on the GPU (`device='mixed'`) or the CPU (`device_id=None`), then two random
resized crops of the one decoded image, as uint8. Rebuilding the graph each epoch (well under a second) is what
makes an epoch's order and augmentation depend only on (seed, epoch), so a resumed run replays them.

The rest of the spec (jitter, grayscale, blur, flip) runs outside the graph, in one of the two executors that
`color_ops` chooses (spec.color_executor): the numba kernels on each batch of views on the CPU
(color_numba.py; DALI then decodes on the CPU too), or batched torch ops on the training device
(batch_augment.py, whose docstring states the semantics). DALI's own colour operators are not used: on the CPU
they ran several times slower than the numba kernels (BENCHMARKS.md), and on a GPU the torch executor runs on
the device.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from . import batch_augment, color_numba
from .augment import IMAGENET_MEAN, IMAGENET_STD, crop_step
from .bad_images import BadImageError, BadImagePolicy, BadImages, find_bad_cached
from .spec import color_executor, to_interface

MEAN255 = [255 * m for m in IMAGENET_MEAN]
STD255 = [255 * s for s in IMAGENET_STD]


def random_crop(images, aug: str, size: int, crop_scale_min: float):
    """One random resized crop of each decoded image: uint8 HWC."""
    crop = crop_step(aug, crop_scale_min)
    return fn.random_resized_crop(images, size=(size, size), random_area=list(crop.params["scale"]),
                                  random_aspect_ratio=list(crop.params["ratio"]), antialias=True)


@pipeline_def
def _train_graph(files, labels, shard_id, num_shards, decode_device, aug, size, crop_scale_min):
    jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                   pad_last_batch=True, random_shuffle=False, name="Reader")
    images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    return (random_crop(images, aug, size, crop_scale_min), random_crop(images, aug, size, crop_scale_min),
            label)


@pipeline_def
def _eval_graph(files, labels, decode_device, size, crop_ratio):
    jpegs, label = fn.readers.file(files=files, labels=labels, pad_last_batch=True, random_shuffle=False,
                                   name="Reader")
    images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=round(size / crop_ratio), antialias=True)
    return fn.crop_mirror_normalize(images, crop=(size, size), mean=MEAN255, std=STD255, output_layout="HWC",
                                    dtype=types.FLOAT), label


def epoch_files(n: int, seed: int, epoch: int, world_size: int, shuffle: bool) -> np.ndarray:
    """DistributedSampler's index order for (seed, epoch), padded to a multiple of world_size.

    DALI then gives shard r the r-th contiguous block of ceil(n / world_size) indices.
    """
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
    else:
        order = np.arange(n)
    total = math.ceil(n / world_size) * world_size
    return np.concatenate([order, order[:total - n]]) if total > n else order


class DALILoader:
    """(view1, view2, labels) [train] or (images, labels) [eval] on `device`: the torchvision loader's interface."""

    def __init__(self, dataset, batch_size: int, workers: int, device: torch.device, *, train: bool,
                 aug: str = "mocov2", image_size: int = 224, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = True, color_ops: str = "auto", eval_crop_ratio: float = 0.875,
                 crop_scale_min: float = 0.0, bad_images: BadImagePolicy = BadImagePolicy(),
                 cache_dir: str = "~/.cache/fastft"):
        self.dataset = dataset  # a SubsetImageFolder: .samples (path, label), .classes
        if len(dataset) == 0:
            raise ValueError(f"{dataset.root}: no images")
        self.samples, self.unreadable = readable_samples(dataset, workers, cache_dir)
        self.bad = BadImages(bad_images, math.ceil(len(dataset) / world_size) if train else len(dataset),
                             str(dataset.root))
        if bad_images.on_bad == "error":
            for path, reason in self.unreadable.items():
                self.bad.report(path, reason)  # stops at the first
        self.batch_size, self.threads, self.device, self.train = batch_size, max(1, workers), device, train
        self.aug, self.image_size, self.seed, self.rank, self.world_size = aug, image_size, seed, rank, world_size
        self.crop_scale_min = crop_scale_min
        self.channels_last, self.eval_crop_ratio = channels_last, eval_crop_ratio
        self.executor = color_executor(color_ops, device)  # "numba" or "torch": where the colour steps run
        # DALI decodes on the GPU unless the numba executor needs the training views in host memory.
        self.gpu = device.type == "cuda" and not (train and self.executor == "numba")
        self.epoch = 0
        self._gen = torch.Generator()  # the torch executor's draws, seeded per epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.train:
            return math.ceil(n / self.world_size) // self.batch_size
        return math.ceil(n / self.batch_size)

    def _pipeline(self):
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.gpu else None
        decode_device = "mixed" if self.gpu else "cpu"
        paths = [p for p, _ in self.samples]
        labels = [int(y) for _, y in self.samples]
        common = dict(batch_size=self.batch_size, num_threads=self.threads, device_id=device_id,
                      prefetch_queue_depth=2, exec_dynamic=True,
                      seed=(self.seed * 1_000_003 + self.epoch * 1009 + self.rank) % (2 ** 31 - 1))
        if not self.train:
            return _eval_graph(paths, labels, decode_device, self.image_size, self.eval_crop_ratio, **common)
        order = epoch_files(len(paths), self.seed, self.epoch, self.world_size, shuffle=True)
        return _train_graph([paths[i] for i in order], [labels[i] for i in order], self.rank, self.world_size,
                            decode_device, self.aug, self.image_size, self.crop_scale_min, **common)

    def _to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """DALI's NHWC output -> the interface's NCHW (a channels-last view: no copy)."""
        x = x.permute(0, 3, 1, 2)
        return x if self.channels_last else x.contiguous()

    def _views(self, u8: torch.Tensor) -> torch.Tensor:
        """Cropped uint8 NHWC views -> the rest of the spec in the executor -> the interface, on the device."""
        if self.executor == "numba":
            color_numba.augment_batch(u8.numpy(), self.aug, self.image_size, self.threads)  # in place
            return to_interface(u8.to(self.device, non_blocking=True), self.executor, self.channels_last)
        return batch_augment.augment_uint8_nhwc(u8.to(self.device, non_blocking=True), self.aug, self.image_size,
                                                self._gen, self.channels_last)

    def _shard_files(self) -> list[str]:
        """This rank's files of this epoch, in the order DALI reads them (as listed: unreadable ones included)."""
        paths = [p for p, _ in self.dataset.samples]
        if not self.train:
            return paths
        order = epoch_files(len(paths), self.seed, self.epoch, self.world_size, shuffle=True)
        per = len(order) // self.world_size
        return [paths[i] for i in order[self.rank * per:(self.rank + 1) * per]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        done = 0
        for path in self._shard_files()[:len(self) * self.batch_size]:  # the files this epoch reads
            if path in self.unreadable:
                self.bad.report(path, self.unreadable[path])
        try:
            pipe = self._pipeline()
            seed = self.seed * 1_000_003 + self.epoch * 1009 + self.rank  # the colour draws of this epoch
            if self.train and self.executor == "numba":
                color_numba.seed(seed)
            self._gen.manual_seed(seed)
            names = ["view1", "view2", "label"] if self.train else ["images", "label"]
            policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
            it = DALIGenericIterator(pipe, names, reader_name="Reader", last_batch_policy=policy, auto_reset=False)
            for _, out in zip(range(len(self)), it):
                batch = out[0]
                labels = batch["label"].view(-1).long().to(self.device, non_blocking=True)
                if not self.train:
                    yield self._to_nchw(batch["images"]).to(self.device), labels
                else:
                    yield self._views(batch["view1"]), self._views(batch["view2"]), labels
                done += 1
        except RuntimeError as e:
            if "decoders" not in str(e) and "decode" not in str(e).lower():
                raise
            # DALI does not say which file failed: look for it where the reader was (this batch and the
            # prefetched ones after it), with PIL, which names the problem.
            files = self._shard_files()
            window = files[done * self.batch_size:(done + 4) * self.batch_size]
            raise RuntimeError(undecodable_message(window, str(e))) from None


def readable_samples(dataset, workers: int, cache_dir: str) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """The dataset's (path, label) samples with each unreadable file replaced by the next one that reads (so the
    epoch keeps its length and order), and the unreadable files with the reason.

    DALI cannot leave a file out once a batch is under way, so the files are checked before the graph is built,
    with the judge of every backend, and the answer is kept in `cache_dir` for the same files
    (bad_images.find_bad_cached): a resumed run, or the kNN monitor every epoch, does not check again.
    """
    samples = list(dataset.samples)
    unreadable = find_bad_cached([p for p, _ in samples], max(1, workers), cache_dir)
    if len(unreadable) == len(samples):
        raise BadImageError(f"no image of {dataset.root} can be read (first: {samples[0][0]})")
    n = len(samples)
    for i, (path, _) in enumerate(samples):
        if path in unreadable:
            samples[i] = next(samples[j % n] for j in range(i + 1, i + n) if samples[j % n][0] not in unreadable)
    return samples, unreadable


def undecodable_message(candidates: list[str], dali_error: str) -> str:
    from .bad_images import load_rgb

    for path in candidates:
        try:
            load_rgb(path).load()
        except RuntimeError as bad:  # load_rgb's error names the file and the reason
            return f"DALI loader: {bad}"
    shown = ", ".join(candidates[:3]) + (f" and {len(candidates) - 3} more" if len(candidates) > 3 else "")
    return (f"DALI loader: an image could not be decoded by DALI (PIL reads them all) among: {shown}\n"
            f"DALI's error: {dali_error.strip()}")
