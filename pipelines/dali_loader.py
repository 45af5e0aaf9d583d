"""DALI backend (extra `dali`, nvidia-dali-cuda130): the ImageFolder files, two views from one decode.

One DALI graph per epoch: `fn.readers.file` over this epoch's file list (shuffled by (seed, epoch) like
DistributedSampler and padded so that every rank's shard (`shard_id`, `num_shards`, `pad_last_batch`) holds
ceil(N / world) samples, hence the same number of batches everywhere and the torchvision loader's epoch
length), `fn.decoders.image` on the GPU (`device='mixed'`) or the CPU (`device_id=None`), then the
augmentation spec twice on the one decoded image. Rebuilding the graph each epoch (well under a second) is what
makes an epoch's order and augmentation depend only on (seed, epoch), so a resumed run replays them.

The colour steps, exactly torchvision's (batch_augment.py states them):
- brightness, contrast, saturation and hue in a random order per image (the ranking of four uniform keys),
  each op clipping to uint8 like PIL; conditionals route every image through exactly its four ops.
- contrast pivots on the image's mean grey (`brightness_contrast` pivots on `contrast_center`, by default the
  fixed mid grey 128, which torchvision does not use; and on the GPU that mean would be GPU data, which DALI
  does not take as a per-sample argument), so contrast is a blend with the mean written in DALI arithmetic.
- saturation is DALI's `hsv` saturation (a blend with ITU-R 601 luma, as PIL's "L"); grayscale is that luma
  (`color_space_conversion` to GRAY) in all three channels.
- hue: DALI's `hue`/`hsv` rotate chroma in YIQ space, which is not torchvision's HSV hue shift (it also moves
  value and saturation), so the HSV rotation is written out in DALI arithmetic (`_hsv_hue`).
- random-apply steps (jitter p, grayscale p, blur p) are DALI conditionals; the flip is the mirror flag of
  `crop_mirror_normalize`, which also normalises (flip commutes with every step after the crop).
With `color_ops='device'` the graph stops after the crop and batch_augment.py runs the rest on the device.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from . import batch_augment, color_numba
from .augment import AUG_SPECS, IMAGENET_MEAN, IMAGENET_STD, Step, blur_kernel_size, crop_step

MEAN255 = [255 * m for m in IMAGENET_MEAN]
STD255 = [255 * s for s in IMAGENET_STD]
LUMA = batch_augment.LUMA


def _float(x):
    return fn.cast(x, dtype=types.FLOAT)


def _mean_grey(v):
    """Per-image mean luma of a uint8 HWC image, in 0..255 (the mean of luma = luma of the channel means)."""
    m = fn.reductions.mean(v, axes=[0, 1])
    return LUMA[0] * m[0] + LUMA[1] * m[1] + LUMA[2] * m[2]


def _brightness(v, f):
    return fn.brightness_contrast(v, brightness=f)


def _on(param, image):
    """A per-sample parameter on the image's device, for arithmetic with it (argument inputs stay on the CPU)."""
    return param.gpu() if image.device == "gpu" else param


def _contrast(v, f):
    """Blend with the image's mean grey (torchvision's pivot). Written in arithmetic rather than as
    brightness_contrast(contrast_center=...) because on the GPU the mean is GPU data, and DALI takes
    per-sample arguments (contrast_center) only from the CPU."""
    f = _on(f, v)
    out = dmath.clamp(f * _float(v) + (1.0 - f) * _mean_grey(v), 0.0, 255.0)
    return fn.reshape(fn.cast(out, dtype=types.UINT8), layout="HWC")


def _saturation(v, f):
    return fn.hsv(v, saturation=f)


def _hsv_hue(v, h):
    """Rotate the HSV hue of a uint8 HWC image by h turns: torchvision's adjust_hue, in DALI arithmetic.

    With V = max, C = max - min and the hue H in [0, 6): channel = V - C * clamp(min(t, 4 - t), 0, 1) with
    t = (n + H + 6h) mod 6 and n = 5, 3, 1 for R, G, B.
    """
    x = _float(v)
    h = _on(h, v)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    vmax = dmath.max(r, dmath.max(g, b))
    chroma = vmax - dmath.min(r, dmath.min(g, b))
    safe = chroma + _float(chroma <= 0.0)
    is_r = _float(vmax == r)
    is_g = _float(vmax == g) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    hue6 = (is_r * ((g - b) / safe) + is_g * ((b - r) / safe + 2.0) + is_b * ((r - g) / safe + 4.0)
            + 6.0 * h)
    out = []
    for n in batch_augment.HSV_OFFSETS:
        t = hue6 + n
        t = t - 6.0 * dmath.floor(t / 6.0)
        out.append(vmax - chroma * dmath.clamp(dmath.min(t, 4.0 - t), 0.0, 1.0))
    return fn.cast(fn.stack(*out, axis=2, axis_name="C"), dtype=types.UINT8)


def _jitter(v, step: Step):
    """torchvision's ColorJitter: the four ops in a random order per image, each clipping to uint8 as PIL does.

    The order is the ranking of four uniform keys; at each of the four positions a conditional sends every
    image to the op ranked there, so each image runs exactly four ops (no identity passes).
    """
    p = step.params
    factors = [fn.random.uniform(range=(max(0.0, 1 - p[k]), 1 + p[k])) for k in ("brightness", "contrast",
                                                                               "saturation")]
    hue = fn.random.uniform(range=(-p["hue"], p["hue"]))
    return _jitter_in_order(v, factors, hue, [fn.random.uniform(range=(0.0, 1.0)) for _ in range(4)])


def _jitter_in_order(v, factors: list, hue, keys: list):
    """Brightness, contrast, saturation (factors) and hue, ordered by their keys (smallest first)."""
    rank = [sum(fn.cast(other < key, dtype=types.INT32) for other in keys) for key in keys]
    for position in range(4):
        if rank[0] == position:
            v = _brightness(v, factors[0])
        elif rank[1] == position:
            v = _contrast(v, factors[1])
        elif rank[2] == position:
            v = _saturation(v, factors[2])
        else:
            v = _hsv_hue(v, hue)
    return v


def _grayscale(v):
    """Luma in all three channels, exactly equal (hsv(saturation=0) leaves them +-1 apart after YIQ)."""
    g = fn.color_space_conversion(v, image_type=types.RGB, output_type=types.GRAY)
    return fn.cat(g, g, g, axis=2)


def _coin(p: float):
    return fn.cast(fn.random.coin_flip(probability=p), dtype=types.BOOL)


def _view(images, aug: str, size: int, color_in_graph: bool, crop_scale_min: float):
    """One augmented view of the decoded images: uint8 HWC and the mirror flag (applied by the caller)."""
    crop, steps = crop_step(aug, crop_scale_min), AUG_SPECS[aug][1:]
    v = fn.random_resized_crop(images, size=(size, size), random_area=list(crop.params["scale"]),
                               random_aspect_ratio=list(crop.params["ratio"]), antialias=True)
    mirror = 0
    if not color_in_graph:
        return v, mirror
    for step in steps:
        if step.name == "color_jitter":
            if _coin(step.p):
                v = _jitter(v, step)
        elif step.name == "grayscale":
            if _coin(step.p):
                v = _grayscale(v)
        elif step.name == "gaussian_blur":
            if _coin(step.p):
                v = fn.gaussian_blur(v, sigma=fn.random.uniform(range=step.params["sigma"]),
                                     window_size=blur_kernel_size(size))
        elif step.name == "horizontal_flip":
            mirror = fn.random.coin_flip(probability=step.p)
        else:
            raise ValueError(f"DALI backend: unknown augmentation step {step.name!r}")
    return v, mirror


def _finish(v, mirror, normalise: bool):
    if not normalise:  # the device finishes it (batch_augment)
        return v
    return fn.crop_mirror_normalize(v, mirror=mirror, mean=MEAN255, std=STD255, output_layout="HWC",
                                    dtype=types.FLOAT)


@pipeline_def(enable_conditionals=True)
def _train_graph(files, labels, shard_id, num_shards, decode_device, aug, size, color_in_graph, crop_scale_min):
    jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                   pad_last_batch=True, random_shuffle=False, name="Reader")
    images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
    views = [_finish(*_view(images, aug, size, color_in_graph, crop_scale_min), normalise=color_in_graph)
             for _ in range(2)]
    return views[0], views[1], label


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
                 crop_scale_min: float = 0.0):
        self.dataset = dataset  # a SubsetImageFolder: .samples (path, label), .classes
        self.crop_scale_min = crop_scale_min
        if len(dataset) == 0:
            raise ValueError(f"{dataset.root}: no images")
        self.batch_size, self.threads, self.device, self.train = batch_size, max(1, workers), device, train
        self.aug, self.image_size, self.seed, self.rank, self.world_size = aug, image_size, seed, rank, world_size
        self.channels_last, self.eval_crop_ratio = channels_last, eval_crop_ratio
        # Where the colour steps run: the DALI graph ("graph"), numba threads on the CPU output ("numba"), or
        # batched tensor ops on the device ("torch"). On the CPU, DALI's blur and the arithmetic hue cost several
        # times the numba kernels (measured: BENCHMARKS.md), so auto picks numba there when it is installed.
        if color_ops == "loader" or (color_ops == "auto" and device.type == "cuda"):
            self.post = "graph"
        elif color_ops == "auto" and color_numba.available():
            self.post = "numba"
        elif color_ops == "auto":
            self.post = "graph"
        else:
            self.post = "torch"
        self.color_in_graph = self.post == "graph"
        self.epoch = 0
        self._gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.train:
            return math.ceil(n / self.world_size) // self.batch_size
        return math.ceil(n / self.batch_size)

    def _pipeline(self):
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if gpu else None
        paths = [p for p, _ in self.dataset.samples]
        labels = [int(y) for _, y in self.dataset.samples]
        common = dict(batch_size=self.batch_size, num_threads=self.threads, device_id=device_id,
                      prefetch_queue_depth=2, exec_dynamic=True,
                      seed=(self.seed * 1_000_003 + self.epoch * 1009 + self.rank) % (2 ** 31 - 1))
        if not self.train:
            return _eval_graph(paths, labels, "mixed" if gpu else "cpu", self.image_size, self.eval_crop_ratio,
                               **common)
        order = epoch_files(len(paths), self.seed, self.epoch, self.world_size, shuffle=True)
        return _train_graph([paths[i] for i in order], [labels[i] for i in order], self.rank, self.world_size,
                            "mixed" if gpu else "cpu", self.aug, self.image_size, self.color_in_graph, self.crop_scale_min,
                            **common)

    def _to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """DALI's NHWC output -> the interface's NCHW (a channels-last view: no copy)."""
        x = x.permute(0, 3, 1, 2)
        return x if self.channels_last else x.contiguous()

    def _device_views(self, u8: torch.Tensor) -> torch.Tensor:
        if self.post == "numba":
            color_numba.augment_batch(u8.numpy(), self.aug, self.image_size, self.threads)  # in place
            return batch_augment.normalize_uint8_nhwc(u8, self.channels_last)
        x = u8.permute(0, 3, 1, 2).float().div_(255)
        x = batch_augment.augment(x, self.aug, self.image_size, self._gen)
        return batch_augment.normalize(x, self.channels_last)

    def _shard_files(self) -> list[str]:
        """This rank's files of this epoch, in the order DALI reads them."""
        paths = [p for p, _ in self.dataset.samples]
        if not self.train:
            return paths
        order = epoch_files(len(paths), self.seed, self.epoch, self.world_size, shuffle=True)
        per = len(order) // self.world_size
        return [paths[i] for i in order[self.rank * per:(self.rank + 1) * per]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        done = 0
        try:
            pipe = self._pipeline()
            if self.post == "numba":
                color_numba.seed(self.seed * 1_000_003 + self.epoch * 1009 + self.rank)
            names = ["view1", "view2", "label"] if self.train else ["images", "label"]
            policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
            it = DALIGenericIterator(pipe, names, reader_name="Reader", last_batch_policy=policy, auto_reset=False)
            for _, out in zip(range(len(self)), it):
                batch = out[0]
                labels = batch["label"].view(-1).long().to(self.device, non_blocking=True)
                if not self.train:
                    yield self._to_nchw(batch["images"]).to(self.device), labels
                elif self.color_in_graph:
                    yield self._to_nchw(batch["view1"]), self._to_nchw(batch["view2"]), labels
                else:
                    yield self._device_views(batch["view1"]), self._device_views(batch["view2"]), labels
                done += 1
        except RuntimeError as e:
            if "decoders" not in str(e) and "decode" not in str(e).lower():
                raise
            # DALI does not say which file failed: look for it where the reader was (this batch and the
            # prefetched ones after it), with PIL, which names the problem.
            files = self._shard_files()
            window = files[done * self.batch_size:(done + 4) * self.batch_size]
            raise RuntimeError(undecodable_message(window, str(e))) from None


def undecodable_message(candidates: list[str], dali_error: str) -> str:
    from .imagefolder import load_rgb

    for path in candidates:
        try:
            load_rgb(path).load()
        except RuntimeError as bad:  # load_rgb's error names the file and the reason
            return f"DALI loader: {bad}"
    shown = ", ".join(candidates[:3]) + (f" and {len(candidates) - 3} more" if len(candidates) > 3 else "")
    return (f"DALI loader: an image could not be decoded by DALI (PIL reads them all) among: {shown}\n"
            f"DALI's error: {dali_error.strip()}")
