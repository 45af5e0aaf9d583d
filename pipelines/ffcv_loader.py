"""FFCV backend (extra `ffcv`, ffcv==1.0.2): .beton files, two views from one decode, the loader interface.

Every `ffcv` import of the project lives in this module (ffcv is pinned and effectively unmaintained).

Per batch, in FFCV's threads (numba, no interpreter): read the stored image, decode it ONCE and cut two
random resized crops (torchvision's sampler). The rest of the spec runs in the executor that `color_ops`
chooses (spec.color_executor): numba, as a stage in FFCV's threads on each view (color_numba.py) - before
ToTensor, because ffcv 1.0.2 hangs on the CPU when a jitted op follows ToTensor/ToTorchImage - or torch,
as batched tensor ops on the device (batch_augment.py), where on a GPU they are nearly free and keep the
loader threads on decoding. Either way the views leave as uint8 and are normalised on the training device.

A .beton written by `fastft-convert-dataset` has a sidecar `<file>.json` (classes, source paths, samples
skipped as unreadable): it lets errors name the source file and lets eval code see `dataset.classes`.
"""
from __future__ import annotations

import functools
import json
from dataclasses import replace
from pathlib import Path
from queue import Empty
from typing import Callable, Iterator, Sequence
from unittest import mock

import ffcv.writer
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.decoders import CenterCropRGBImageDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder, get_random_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import Squeeze, ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder
from ffcv.writer import DatasetWriter
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from . import batch_augment, color_numba
from .augment import blur_kernel_size, crop_step
from .bad_images import BadImagePolicy, BadImages
from .spec import color_executor, to_interface

META_FORMAT = "fastft-beton/1"
SKIPPED = "unreadable when converted (skipped by fastft-convert-dataset --skip-bad)"


# ----------------------------------------------------------------------------------------------- metadata

def meta_path(beton: str | Path) -> Path:
    return Path(str(beton) + ".json")


class BetonInfo:
    """What the sidecar says about a .beton: classes, source files, skipped samples (the `dataset` of a loader)."""

    def __init__(self, beton: str | Path):
        self.path = Path(beton)
        side = meta_path(beton)
        if not self.path.is_file():
            raise FileNotFoundError(f"{beton}: no such .beton file (write one with `fastft-convert-dataset SRC "
                                    f"{beton}`)")
        if not side.is_file():
            raise FileNotFoundError(f"{beton}: its metadata {side} is missing; was it written by "
                                    f"fastft-convert-dataset? Convert again with --force")
        meta = json.loads(side.read_text())
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"{side}: format {meta.get('format')!r}, expected {META_FORMAT!r}")
        self.classes: list[str] = meta["classes"]
        self.files: list[str] = meta["files"]
        self.root: str = meta.get("root", "")
        self.bad: set[int] = set(meta.get("bad", []))
        self.good = np.array([i for i in range(len(self.files)) if i not in self.bad], dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.good)

    def source(self, index: int) -> str:
        return str(Path(self.root) / self.files[index]) if 0 <= index < len(self.files) else f"sample {index}"


# ----------------------------------------------------------------------------------------------- writing

def write_beton(path: str | Path, dataset, *, write_mode: str, max_resolution: int | None, jpeg_quality: int,
                compress_probability: float, smart_threshold: int, num_workers: int, chunksize: int = 64) -> None:
    """Write `dataset` ((uint8 HxWx3 array, label) per index) to `path` with FFCV's writer and its progress bar,
    drawn on a terminal only (`disable=None`: in a log file its redraws pile up as carriage-return frames)."""
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability, smart_threshold=smart_threshold),
        "label": IntField(),
    }
    with mock.patch.object(ffcv.writer, "tqdm", functools.partial(tqdm, disable=None)):
        DatasetWriter(str(path), fields, num_workers=num_workers).from_indexed_dataset(dataset, chunksize=chunksize)


def read_beton(path: str | Path) -> Iterator[tuple[np.ndarray, int]]:
    """Every stored sample as (uint8 HxWx3 image, label), in file order: for checks and inspection, not speed."""
    import cv2
    from ffcv.reader import Reader

    reader = Reader(str(path))
    image_col, label_col = (f"f{reader.field_names.index(n)}" for n in ("image", "label"))
    sizes = {int(a["ptr"]): int(a["size"]) for a in reader.alloc_table}
    with open(path, "rb") as f:
        for rec in reader.metadata:
            img, label = rec[image_col], int(rec[label_col])
            f.seek(int(img["data_ptr"]))
            h, w = int(img["height"]), int(img["width"])
            if img["mode"] == IMAGE_MODES["jpg"]:
                data = np.frombuffer(f.read(sizes[int(img["data_ptr"])]), dtype=np.uint8)
                pixels = cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            else:
                pixels = np.frombuffer(f.read(h * w * 3), dtype=np.uint8).reshape(h, w, 3)
            yield pixels, label


def image_offset(path: str | Path, index: int) -> int:
    """Byte offset of sample `index`'s stored image in a .beton (tests damage it there)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    return int(reader.metadata[index][f"f{reader.field_names.index('image')}"]["data_ptr"])


# ----------------------------------------------------------------------------------------------- operations

class TwoViewCropDecoder(SimpleRGBImageDecoder):
    """Decode each stored image once and cut two RandomResizedCrops of it: output [2, S, S, 3] uint8 per sample.

    (A subclass of the field's default decoder, which is how ffcv recognises a decoder at a pipeline's head.)

    Unlike ffcv's RandomResizedCropRGBImageDecoder, the full-size decode buffer is allocated per image
    (not batch x largest image, which for ImageNet's largest photos would be tens of GB), and a JPEG that
    fails to decode raises (naming its index) instead of passing on garbage.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float]):
        Operation.__init__(self)
        self.size = size
        self.scale = np.array(scale, dtype=np.float64)
        self.ratio = np.array(ratio, dtype=np.float64)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        shape = (2, self.size, self.size, 3)
        return replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1")), \
            AllocationQuery(shape, np.dtype("u1"))

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        crop_c = Compiler.compile(get_random_crop)
        jpg = IMAGE_MODES["jpg"]
        scale, ratio = self.scale, self.ratio

        def decode(batch_indices, destination, metadata, storage_state):
            n = len(batch_indices)
            status = np.zeros(n, dtype=np.int64)
            for k in my_range(n):
                field = metadata[batch_indices[k]]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    full = np.empty((height, width, 3), dtype=np.uint8)
                    status[k] = imdecode_c(data, full, height, width, height, width, 0, 0, 1, 1, False, False)
                else:
                    full = data.reshape(height, width, 3)
                for v in range(2):
                    i, j, h, w = crop_c(height, width, scale, ratio)
                    resize_crop_c(full, i, i + h, j, j + w, destination[k, v])
            for k in range(n):
                if status[k] != 0:
                    raise ValueError("fastft: cannot decode the image stored at sample", batch_indices[k])
            return destination[:n]

        decode.is_parallel = True
        return decode


class TwoViewColorOps(Operation):
    """The spec's steps after the crop (color_numba.py) on both views, in place, in the loader's threads."""

    def __init__(self, aug: str, image_size: int):
        super().__init__()
        self.table = color_numba.step_table(aug)
        self.prog = color_numba.program(aug)
        self.blur_size = blur_kernel_size(image_size)

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, None]:
        return replace(previous_state, jit_mode=True), None

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        draw_params, augment_view = color_numba.kernels()[:2]
        table, prog, blur_size, nparams = self.table, self.prog, self.blur_size, color_numba.PARAMS

        def color(images, _):
            n = images.shape[0]
            prm = np.empty((2 * n, nparams), dtype=np.float32)
            draw_params(table, prm)  # serially: numba's per-thread generators then need no coordination
            for t in my_range(2 * n):
                k, v = t // 2, t % 2
                augment_view(images[k, v], images[k, v], prm[t], prog, blur_size)
            return images

        color.is_parallel = True
        return color


class ShardOrder(TraversalOrder):
    """DistributedSampler's order (shuffled by seed + epoch, padded, rank::world) for an explicit rank.

    ffcv's own distributed order asks torch.distributed for the rank; this one also works for simulated ranks
    and gives every rank ceil(N / world) samples, hence the same number of batches (the torchvision loader's).
    ffcv wants an instance that it calls with the loader, hence __call__.
    """

    def __init__(self, rank: int, world_size: int, shuffle: bool):
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle

    def __call__(self, loader: Loader) -> "ShardOrder":
        super().__init__(loader)
        self.sampler = DistributedSampler(self.indices, num_replicas=self.world_size, rank=self.rank,
                                          shuffle=self.shuffle, seed=self.seed, drop_last=False)
        return self

    def sample_order(self, epoch: int) -> Sequence[int]:
        self.sampler.set_epoch(epoch)
        return self.indices[np.array(list(self.sampler), dtype=np.int64)]


class _SafeEpochIterator(EpochIterator):
    """ffcv's epoch thread dies silently on an exception and the consumer then waits forever: keep the error."""

    def run(self):
        self.error = None
        try:
            super().run()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            self.error = e
            self.output_queue.put(None)

    def __next__(self):
        while True:
            try:
                item = self.output_queue.get(timeout=1.0)
                break
            except Empty:
                if not self.is_alive() and self.output_queue.empty():
                    item = None
                    break
        if item is None:
            self.close()
            if getattr(self, "error", None) is not None:
                raise self.error
            raise StopIteration()
        slot, result = item
        if torch.cuda.is_available():
            self.current_stream.wait_stream(self.cuda_streams[slot])
        return result


class _Loader(Loader):
    def __iter__(self):
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        selected = order[:len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        return _SafeEpochIterator(self, selected)


# ----------------------------------------------------------------------------------------------- the loader

Batch = tuple[torch.Tensor, ...]


class FFCVLoader:
    """(view1, view2, labels) [train] or (images, labels) [eval] on `device`: the torchvision loader's interface."""

    def __init__(self, beton: str | Path, batch_size: int, workers: int, device: torch.device, *, train: bool,
                 aug: str = "mocov2", image_size: int = 224, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = True, color_ops: str = "auto", eval_crop_ratio: float = 0.875,
                 crop_scale_min: float = 0.0, bad_images: BadImagePolicy = BadImagePolicy()):
        self.dataset = BetonInfo(beton)
        if len(self.dataset) == 0:
            raise ValueError(f"{beton}: holds no readable images")
        # Files the converter skipped as unreadable (--skip-bad) fall under the policy like any loader's: named,
        # counted every epoch (on rank 0: every rank reads the same sidecar) and held to max_fraction; or stop.
        self.bad = BadImages(bad_images, len(self.dataset.files), self.dataset.root or str(beton))
        self.skipped = [self.dataset.source(i) for i in sorted(self.dataset.bad)]
        self.rank = rank
        if bad_images.on_bad == "error":
            for path in self.skipped:
                self.bad.report(path, SKIPPED)
        self.device, self.train, self.aug, self.image_size = device, train, aug, image_size
        self.channels_last, self.seed = channels_last, seed
        self.batch_size = batch_size
        self.executor = color_executor(color_ops, device)  # "numba" or "torch": where the colour steps run
        on_gpu = device.type == "cuda"
        if train:
            crop = crop_step(aug, crop_scale_min).params
            image = [TwoViewCropDecoder(image_size, crop["scale"], crop["ratio"])]
            if self.executor == "numba":
                image.append(TwoViewColorOps(aug, image_size))
        else:
            image = [CenterCropRGBImageDecoder((image_size, image_size), ratio=eval_crop_ratio)]
        image.append(ToTensor())  # every jitted op comes before this (ffcv's CPU hang)
        label = [IntDecoder(), ToTensor(), Squeeze(1)]
        if on_gpu:
            image.append(ToDevice(device, non_blocking=True))
            label.append(ToDevice(device, non_blocking=True))
        self._gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self._loader = _Loader(str(beton), batch_size=batch_size, num_workers=max(1, workers),
                               order=ShardOrder(rank, world_size, shuffle=train), seed=seed,
                               indices=self.dataset.good, drop_last=train, batches_ahead=2,
                               pipelines={"image": image, "label": label})
        if self._loader.reader.num_samples != len(self.dataset.files):
            raise ValueError(f"{beton} holds {self._loader.reader.num_samples} samples but its sidecar "
                             f"{meta_path(beton)} lists {len(self.dataset.files)}: convert it again with --force")

    def set_epoch(self, epoch: int) -> None:
        self._loader.next_epoch = epoch

    def __len__(self) -> int:
        return len(self._loader)

    def _views(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] of one view -> the interface's float32 NCHW, on the device."""
        u8 = u8.to(self.device, non_blocking=True)
        if self.executor == "torch" and self.train:
            return batch_augment.augment_uint8_nhwc(u8, self.aug, self.image_size, self._gen, self.channels_last)
        return to_interface(u8, self.executor, self.channels_last)

    def __iter__(self) -> Iterator[Batch]:
        for path in self.skipped if self.rank == 0 else []:
            self.bad.report(path, SKIPPED)
        try:
            for images, labels in self._loader:
                # ffcv reuses its output buffers a few batches later: never hand one out (labels may be int64).
                labels = labels.to(self.device, non_blocking=True).long().clone()
                if self.train:
                    yield self._views(images[:, 0]), self._views(images[:, 1]), labels
                else:
                    yield self._views(images), labels
        except ValueError as e:
            if len(e.args) == 2 and "cannot decode the image" in str(e.args[0]):
                index = int(e.args[1])
                raise RuntimeError(f"cannot decode image {self.dataset.source(index)} (sample {index} of "
                                   f"{self.dataset.path}): the .beton is damaged; convert it again") from None
            raise
