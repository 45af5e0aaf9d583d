"""Crops for a backend that decodes whole images and crops them afterwards (nvjpeg_loader.py).

RandomResizedCrop boxes are drawn on the host, vectorised, exactly as torchvision's `RandomResizedCrop.get_params`
draws them (augment.py's spec gives scale and ratio); then every box of a batch is cut out of its image and
resized: on CUDA one `roi_align` per distinct image size (its adaptive sampling averages the source pixels under
each output pixel, an antialiased downscale), on the CPU torch's uint8 antialiased bilinear resize per view (its
vectorised path, PIL's filter as torchvision's; 5x faster there than roi_align and than DALI's antialiased CPU
resize, BENCHMARKS.md), the views shared out over a pool of single-threaded workers.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

_TRIES = 10  # RandomResizedCrop.get_params' attempts before the central fallback crop


def crop_boxes(hw: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
               gen: torch.Generator) -> torch.Tensor:
    """[N, 2] image (height, width) -> [N, 4] crop boxes (x1, y1, x2, y2) in pixels, drawn as torchvision's
    RandomResizedCrop.get_params: up to 10 tries of (area share ~ U(scale), log aspect ~ U(log ratio)), the
    first that fits; else the central crop at the aspect clamped to `ratio`. Then a uniform position."""
    n = hw.shape[0]
    h_img, w_img = hw[:, 0:1].double(), hw[:, 1:2].double()
    area = h_img * w_img * (torch.rand(n, _TRIES, generator=gen, dtype=torch.float64) * (scale[1] - scale[0])
                            + scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(n, _TRIES, generator=gen, dtype=torch.float64) * (log_hi - log_lo) + log_lo)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    h_img, w_img = h_img.squeeze(1), w_img.squeeze(1)
    shape_ratio = w_img / h_img  # the fallback: the whole image, cut to the nearest allowed aspect
    fw = torch.where(shape_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img)
    fh = torch.where(shape_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    found = fits.any(dim=1)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    pos = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    y = torch.where(found, torch.floor(pos[:, 0] * (h_img - h + 1)), torch.floor((h_img - h) / 2))
    x = torch.where(found, torch.floor(pos[:, 1] * (w_img - w + 1)), torch.floor((w_img - w) / 2))
    return torch.stack([x, y, x + w, y + h], dim=1).float()


def center_boxes(hw: torch.Tensor, size: int, crop_ratio: float) -> torch.Tensor:
    """Resize(round(size / crop_ratio)) then CenterCrop(size), as boxes in the source's pixels."""
    short = round(size / crop_ratio)
    h, w = hw[:, 0].double(), hw[:, 1].double()
    scale = short / torch.minimum(h, w)  # resized pixels per source pixel
    rh, rw = torch.where(h <= w, torch.full_like(h, short), torch.floor(h * scale)), \
        torch.where(w < h, torch.full_like(w, short), torch.floor(w * scale))
    top, left = torch.round((rh - size) / 2), torch.round((rw - size) / 2)
    sy, sx = h / rh, w / rw
    return torch.stack([left * sx, top * sy, (left + size) * sx, (top + size) * sy], dim=1).float()


# -- decode and resize ----------------------------------------------------------------------------------------
class Threads:
    """A pool of CPU threads of one torch thread each, and how many there are."""

    def __init__(self, n: int):
        self.n = n
        self.pool = ThreadPoolExecutor(n, initializer=torch.set_num_threads, initargs=(1,),
                                       thread_name_prefix="nvjpeg-cpu")

    def map(self, fn, items: list) -> tuple[list, list]:
        """(parts, results): fn over `items` split into n interleaved parts, one per thread."""
        parts = [items[i::self.n] for i in range(self.n) if items[i::self.n]]
        return parts, list(self.pool.map(fn, parts))


def map_threads(threads: Threads | None, fn, items: list) -> tuple[list, list]:
    return threads.map(fn, items) if threads is not None else ([items], [fn(items)])


def resize_crops(images: list[torch.Tensor], boxes: torch.Tensor, owner: torch.Tensor, size: int,
                 method: str, threads: Threads | None = None) -> torch.Tensor:
    """uint8 [V, size, size, 3] (NHWC): view v is box v of images[owner[v]], resized to size x size.

    roi_align: one call per distinct image size, the boxes in pixel edges (aligned=True), adaptive sampling;
    interpolate: per view, uint8 bilinear with antialias (the fast CPU path; PIL's filter, as torchvision), the
    views shared out over `threads`."""
    device = images[0].device
    out = torch.empty(len(boxes), size, size, 3, dtype=torch.uint8, device=device)
    if method == "interpolate":
        box_list, owners = boxes.round().int().tolist(), owner.tolist()

        def run(views: list[int]) -> None:
            for v in views:
                x1, y1, x2, y2 = box_list[v]
                crop = images[owners[v]][:, y1:y2, x1:x2].unsqueeze(0).contiguous(memory_format=torch.channels_last)
                out[v] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                       align_corners=False)[0].permute(1, 2, 0)  # each thread its own views
        map_threads(threads, run, list(range(len(box_list))))
        return out
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[1:]), []).append(i)
    owner_list = owner.tolist()
    for members in groups.values():
        stack = torch.stack([images[i] for i in members]).float()
        slot = {img: k for k, img in enumerate(members)}
        views = [v for v, o in enumerate(owner_list) if o in slot]
        rois = torch.cat([torch.tensor([[slot[owner_list[v]]] for v in views], dtype=torch.float32),
                          boxes[views]], dim=1).to(device)
        res = roi_align(stack, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out[torch.tensor(views, device=device)] = res.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return out
