"""GPU decode with torch alone (`loader.backend: nvjpeg`): torchvision's nvJPEG decode, crops on the device.

The product's claim is two augmented views made straight on the device, and the machines it is checked on
carry torch, torchvision and triton only (no DALI, no FFCV). This backend needs nothing more:

- DataLoader workers only read file bytes (and labels): no decode, no augmentation in the workers.
- JPEGs are decoded in batches by `torchvision.io.decode_jpeg(list, device=...)`: nvJPEG on CUDA, libjpeg-turbo
  through the same call on the CPU (so CI runs this very path). Other formats (PNG, ...) go through
  `decode_image` on the CPU, per file.
- RandomResizedCrop boxes are drawn on the host from the one augmentation spec (augment.py), vectorised as
  torchvision's `RandomResizedCrop.get_params` draws them; both views of an image come from its one decode.
  Cropping and resizing run on the device: on CUDA one `roi_align` per distinct image size (adaptive sampling
  averages the source pixels under each output pixel, an antialiased downscale), on the CPU torch's uint8
  antialiased bilinear resize per view (its vectorised CPU path; roi_align is 5x slower there).
- The steps after the crop run in the executor of `loader.color_ops` (batch_augment.py on the device, or the
  numba kernels on the CPU), then normalisation and channels-last: the loader interface of torchvision_loader.
- The next batch is prepared in a background thread (on its own CUDA stream) while the consumer runs its step.
- Unreadable files follow the bad-image policy of every backend (bad_images.py): when a batch does not decode,
  its files are decoded one by one, a file torchvision refuses is judged by PIL (read with it when PIL can), and
  each unreadable one is reported and replaced by another image of the same batch, so batch shapes hold.

Every random draw of batch b of epoch e comes from (seed, epoch, rank, b): a resumed epoch repeats exactly.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import warnings
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from . import batch_augment, color_numba
from .augment import crop_step
from .bad_images import BadImageError, BadImagePolicy, BadImages, UnreadableImage, load_rgb
from .crops import Threads, center_boxes, crop_boxes, map_threads, resize_crops
from .spec import color_executor, to_interface

# torchvision 0.29 marks its image codecs deprecated in favour of torchcodec, which the GPU check machines do not
# carry; nvJPEG through torchvision is this backend's point. Silenced for exactly that message.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated",
                        category=DeprecationWarning)
JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedFiles(Dataset):
    """(file bytes as a uint8 tensor, label, path) of a SubsetImageFolder's samples: what the workers do."""

    def __init__(self, folder):
        self.folder = folder
        self.samples = folder.samples
        self.classes = folder.classes
        self.root = folder.root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.samples[i]
        with open(path, "rb") as f:
            data = f.read()
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return raw, label, path


def collate_encoded(batch: list[tuple[torch.Tensor, int, str]]) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch], dtype=torch.int64), [b[2] for b in batch]


# -- geometry -------------------------------------------------------------------------------------------------
def is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() >= 3 and bytes(data[:3].tolist()) == JPEG_MAGIC


def decode(datas: list[torch.Tensor], device: torch.device, threads: Threads | None = None
           ) -> list[torch.Tensor]:
    """Encoded files -> uint8 [3, H, W] RGB images on `device`; the JPEGs in one batched call (on the CPU, one per
    thread of `threads`: libjpeg-turbo decodes one image at a time, and the call releases the GIL)."""
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if is_jpeg(d)]
    if jpegs:
        run = (lambda part: decode_jpeg([datas[i] for i in part], mode=ImageReadMode.RGB, device=device))
        for part, decoded in zip(*map_threads(threads if device.type == "cpu" else None, run, jpegs)):
            for i, img in zip(part, decoded):
                out[i] = img
    for i, d in enumerate(datas):
        if out[i] is None:
            out[i] = decode_image(d, mode=ImageReadMode.RGB).to(device, non_blocking=True)
    return out


def decode_each(datas: list[torch.Tensor], paths: list[str], device: torch.device
                ) -> tuple[list[torch.Tensor | None], list[tuple[str, str]]]:
    """One file at a time, for a batch that did not decode: (images, None where unreadable) and the unreadable
    files' (path, reason). What torchvision refuses is judged by PIL, every backend's judge, and read with it when
    PIL can (an exotic JPEG, say), so the policy sees exactly the files no backend could read."""
    images: list[torch.Tensor | None] = []
    bad = []
    for data, path in zip(datas, paths):
        try:
            images.append(decode([data], device)[0])
            continue
        except RuntimeError:
            pass
        try:
            pixels = torch.from_numpy(np.asarray(load_rgb(path)).copy()).permute(2, 0, 1)
            images.append(pixels.to(device))
        except UnreadableImage as e:
            images.append(None)
            bad.append((path, e.reason))
    return images, bad


# -- the loader -----------------------------------------------------------------------------------------------
class NvJPEGLoader:
    """(view1, view2, labels) [train] or (images, labels) [eval] on `device`: the torchvision loader's interface."""

    def __init__(self, dataset, batch_size: int, workers: int, device: torch.device, *, train: bool,
                 aug: str = "mocov2", image_size: int = 224, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = True, color_ops: str = "auto", eval_crop_ratio: float = 0.875,
                 crop_scale_min: float = 0.0, resize: str = "auto", bad_images: BadImagePolicy = BadImagePolicy()):
        if len(dataset) == 0:
            raise ValueError(f"{dataset.root}: no images")
        self.files = EncodedFiles(dataset)
        self.dataset = dataset
        self.batch_size, self.device, self.train = batch_size, device, train
        self.aug, self.image_size, self.seed, self.rank = aug, image_size, seed, rank
        self.crop = crop_step(aug, crop_scale_min).params
        self.channels_last, self.eval_crop_ratio = channels_last, eval_crop_ratio
        self.executor = color_executor(color_ops, device) if train else "torch"
        self.resize = resize if resize != "auto" else ("roi_align" if device.type == "cuda" else "interpolate")
        self.sampler = DistributedSampler(self.files, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=False) if train else None
        # Workers only read bytes: they stay up across epochs (the sampler is iterated in this process).
        self.loader = DataLoader(self.files, batch_size=batch_size, sampler=self.sampler, shuffle=False,
                                 num_workers=workers, collate_fn=collate_encoded, drop_last=train,
                                 persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
        self.epoch = 0
        self.bad = BadImages(bad_images, len(self.sampler) if train else len(dataset), str(dataset.root))
        # On the CPU, decode and resize run in this many threads of one torch thread each (their calls release
        # the GIL; per-thread torch threads keep them from oversubscribing the cores).
        n = torch.get_num_threads()
        self.threads = Threads(n) if device.type == "cpu" and n > 1 else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def _seed(self, batch: int) -> int:
        return (((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank) * 1_000_033 + batch) % (2 ** 63)

    def _interface(self, u8: torch.Tensor) -> torch.Tensor:
        return to_interface(u8, self.executor, self.channels_last)

    def _decode(self, datas: list[torch.Tensor], labels: torch.Tensor, paths: list[str]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The batch's images; each unreadable one reported to the policy and replaced by the next readable image
        of the batch (with its label)."""
        try:
            return decode(datas, self.device, self.threads), labels
        except RuntimeError:
            images, bad = decode_each(datas, paths, self.device)
        for path, reason in bad:
            self.bad.report(path, reason)  # raises under on_bad_image = error
        good = [i for i, img in enumerate(images) if img is not None]
        if not good:
            raise BadImageError(f"no image of a batch of {self.dataset.root} can be read (first: {bad[0][0]}: "
                                f"{bad[0][1]}); fastft-check-dataset {self.dataset.root} lists every such file")
        take = [i if images[i] is not None else next((j for j in good if j > i), good[0]) for i in range(len(images))]
        return [images[j] for j in take], labels[take]

    def prepare(self, datas: list[torch.Tensor], labels: torch.Tensor, paths: list[str], batch: int
                ) -> tuple[torch.Tensor, ...]:
        """One batch of encoded files -> the interface's tensors on the device (what the background thread runs)."""
        images, labels = self._decode(datas, labels, paths)
        hw = torch.tensor([img.shape[1:] for img in images], dtype=torch.int64)
        labels = labels.to(self.device, non_blocking=True)
        n = len(images)
        if not self.train:
            boxes = center_boxes(hw, self.image_size, self.eval_crop_ratio)
            u8 = resize_crops(images, boxes, torch.arange(n), self.image_size, self.resize, self.threads)
            return self._interface(u8), labels
        gen = torch.Generator().manual_seed(self._seed(batch))
        boxes = crop_boxes(hw.repeat(2, 1), self.crop["scale"], self.crop["ratio"], gen)  # view 1s, then view 2s
        u8 = resize_crops(images, boxes, torch.arange(n).repeat(2), self.image_size, self.resize, self.threads)
        if self.executor == "numba":
            color_numba.seed(self._seed(batch))
            color_numba.augment_batch(u8.numpy(), self.aug, self.image_size)  # in place, numba threads
            views = self._interface(u8)
        else:
            views = batch_augment.augment_uint8_nhwc(u8, self.aug, self.image_size, gen, self.channels_last)
        return views[:n], views[n:], labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches prepared one ahead in a background thread (its own CUDA stream on a GPU)."""
        ready: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        batches = iter(self.loader)  # workers start here, in the main thread (never fork from a helper thread)

        def produce() -> None:
            try:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    for b, (datas, labels, paths) in enumerate(batches):
                        if stop.is_set():
                            return
                        out = self.prepare(datas, labels, paths, b)
                        event = stream.record_event() if stream is not None else None
                        ready.put((out, event))
                ready.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                ready.put(e)

        thread = threading.Thread(target=produce, name="nvjpeg-loader", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                out, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in out:
                        t.record_stream(current)
                yield out
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    ready.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

