"""The augmentation spec (augment.py) as batched tensor ops: any device, per-sample random parameters.

One of the two executors of the steps after the crop for the dali and ffcv backends (`color_ops: torch`; the
other is the numba kernels of color_numba.py, on the CPU): it runs after a loader that only decodes and
crops, on the training device, where on a GPU these ops are nearly free. This docstring is the statement of
the colour semantics that both executors implement. They are torchvision's (the reference):

- color_jitter: brightness, contrast, saturation and hue in a random order per image (torchvision draws
  `randperm(4)` per call); brightness/contrast/saturation factors ~ U[max(0, 1 - x), 1 + x], hue ~ U[-h, h];
  contrast blends with the image's mean grey, saturation with its own grey (ITU-R 601 luma, as PIL's "L");
  hue shifts the HSV hue; the result is clipped to [0, 1] after every op.
- grayscale: luma in all three channels. horizontal_flip: mirror.
- gaussian_blur: MoCo's, PIL's GaussianBlur(radius=sigma), sigma ~ U[sigma_min, sigma_max], to the level: on the
  image's 8-bit levels (PIL blurs an 8-bit image), augment.PIL_BLUR_PASSES passes of PIL's box (augment.pil_box_blur:
  its radius, fixed-point weights and rounding) along the rows, then as many down the columns, each pass rounded
  to 8 bits as PIL's are, indices clamped to the image (PIL extends its edge pixels). The result is 8-bit levels.
Each step is applied with its probability `p`, independently per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import AUG_SPECS, IMAGENET_MEAN, IMAGENET_STD, PIL_BLUR_ONE, PIL_BLUR_PASSES, Step, pil_box_blur

LUMA = (0.299, 0.587, 0.114)
# Offsets of R, G, B in the closed-form HSV -> RGB: channel = V - C * clamp(min(t, 4 - t), 0, 1), t = (n + H) mod 6.
HSV_OFFSETS = (5.0, 3.0, 1.0)


def post_crop_steps(aug: str) -> tuple[Step, ...]:
    """The steps after the random resized crop, in the order they are applied."""
    steps = AUG_SPECS[aug]
    if steps[0].name != "random_resized_crop":
        raise ValueError(f"augmentation {aug!r} must start with random_resized_crop, not {steps[0].name}")
    return steps[1:]


def gray(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma."""
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def _col(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _col(f)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = gray(x).mean(dim=(1, 2, 3), keepdim=True)  # torchvision's pivot: the image's mean grey
    return (_col(f) * x + (1 - _col(f)) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (_col(f) * x + (1 - _col(f)) * gray(x)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by h (in turns, [-0.5, 0.5]); value and HSV saturation are kept."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    vmax, _ = x.max(dim=1)
    vmin, _ = x.min(dim=1)
    chroma = vmax - vmin
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue6 = torch.where(vmax == r, torch.remainder((g - b) / safe, 6.0),
                       torch.where(vmax == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue6 = torch.remainder(hue6 + 6.0 * h.view(-1, 1, 1), 6.0)
    out = []
    for n in HSV_OFFSETS:
        t = torch.remainder(n + hue6, 6.0)
        out.append(vmax - chroma * torch.minimum(t, 4.0 - t).clamp(0.0, 1.0))
    return torch.stack(out, dim=1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    return gray(x).expand_as(x).contiguous()


def box_pass(x: torch.Tensor, r: int, weights: tuple[torch.Tensor, ...], dim: int) -> torch.Tensor:
    """One pass of PIL's box of radius r along `dim` (-1: rows, -2: columns) of 8-bit levels x [B, C, H, W]: PIL's
    (ww * window + fw * ends + 2^23) >> 24, window = the sum of the 2 r + 1 taps, ends = that of the two taps
    just outside, indices clamped to the image (replicate padding); `weights` = split_weights of each image.

    Exact in float32: with ww = 256 wh + wl (and fw alike), hi = wh window + fh ends < 255 * 2^16 and
    lo = wl window + fl ends < 255^2 (2 r + 3) are integers below 2^24 (for r < 63), and
    (256 hi + lo + 2^23) >> 24 = floor((hi + floor((lo + 2^23) / 2^8)) / 2^16). (float64 is exact too, but it
    ran the blur 1.7x slower on the CPU.)"""
    n = x.shape[dim]
    padded = F.pad(x, (r + 1, r + 1, 0, 0) if dim == -1 else (0, 0, r + 1, r + 1), mode="replicate")
    window = padded.narrow(dim, 1, n)
    for t in range(2, 2 * r + 2):
        window = window + padded.narrow(dim, t, n)
    ends = padded.narrow(dim, 0, n) + padded.narrow(dim, 2 * r + 2, n)
    wh, fh, wl, fl = weights
    lo = (window * wl).addcmul_(ends, fl).add_(PIL_BLUR_ONE // 2).mul_(2.0 ** -8).floor_()
    return (window * wh).addcmul_(ends, fh).add_(lo).mul_(2.0 ** -16).floor_()


def split_weights(boxes: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """PIL's weights ww, fw of each image's box (augment.pil_box_blur) as float32 [B, 1, 1, 1] halves for box_pass:
    ww >> 8, fw >> 8, ww & 255, fw & 255."""
    ww = torch.tensor([box[1] for box in boxes], dtype=torch.int64)
    fw = torch.tensor([box[2] for box in boxes], dtype=torch.int64)
    return tuple(v.float().view(-1, 1, 1, 1).to(device) for v in (ww >> 8, fw >> 8, ww & 255, fw & 255))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """MoCo's blur with one sigma per image on [B, C, H, W] in [0, 1]: PIL's GaussianBlur(radius=sigma) of its 8-bit
    levels (rounded as color_numba.to_uint8 rounds), to the level; the result in [0, 1] (levels / 255). Images
    are blurred in groups of one box radius (r is 0 below sigma sqrt(2), 1 up to sqrt(6))."""
    boxes = [pil_box_blur(s) for s in sigma.tolist()]
    levels = torch.floor(x.clamp(0.0, 1.0) * 255 + 0.5)
    out = torch.empty_like(levels)
    for r in sorted({box[0] for box in boxes}):
        group = [i for i, box in enumerate(boxes) if box[0] == r]
        idx = torch.tensor(group, device=x.device)
        weights = split_weights([boxes[i] for i in group], x.device)
        y = levels[idx]
        for dim in (-1, -2):  # PIL: every pass along the rows, then every pass down the columns
            for _ in range(PIL_BLUR_PASSES):
                y = box_pass(y, r, weights, dim)
        out[idx] = y
    return out / 255


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def _apply_to(x: torch.Tensor, mask: torch.Tensor, fn, *params: torch.Tensor) -> torch.Tensor:
    """x with fn applied to the images where mask is set (params indexed alike); the others untouched."""
    idx = mask.nonzero().flatten()
    if len(idx) == 0:
        return x
    dev = idx.to(x.device)
    x = x.clone()
    x[dev] = fn(x[dev], *(p[idx].to(x.device) for p in params))
    return x


def color_jitter(x: torch.Tensor, step: Step, gen: torch.Generator, apply: torch.Tensor) -> torch.Tensor:
    p = step.params
    n = x.shape[0]
    factors = [_uniform(n, max(0.0, 1 - p[k]), 1 + p[k], gen) for k in ("brightness", "contrast", "saturation")]
    hue = _uniform(n, -p["hue"], p["hue"], gen)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    params = (*factors, hue)
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)  # a uniform random permutation per image
    for pos in range(4):
        for k in range(4):
            x = _apply_to(x, apply & (order[:, pos] == k), ops[k], params[k])
    return x


def augment(x: torch.Tensor, aug: str, image_size: int, gen: torch.Generator,
            steps: tuple[Step, ...] | None = None) -> torch.Tensor:
    """Every step after the crop on a float [B, 3, H, W] batch in [0, 1]; random draws from `gen` (CPU)."""
    n = x.shape[0]
    for step in (post_crop_steps(aug) if steps is None else steps):
        apply = torch.rand(n, generator=gen) < step.p
        if step.name == "color_jitter":
            x = color_jitter(x, step, gen, apply)
        elif step.name == "grayscale":
            x = _apply_to(x, apply, rgb_to_grayscale)
        elif step.name == "gaussian_blur":
            lo, hi = step.params["sigma"]
            x = _apply_to(x, apply, gaussian_blur, _uniform(n, lo, hi, gen))
        elif step.name == "horizontal_flip":
            x = _apply_to(x, apply, lambda v: v.flip(-1))
        else:
            raise ValueError(f"unknown augmentation step {step.name!r} after the crop")
    return x


def augment_uint8_nhwc(u8: torch.Tensor, aug: str, image_size: int, gen: torch.Generator,
                       channels_last: bool = True) -> torch.Tensor:
    """Cropped uint8 [B, H, W, 3] views -> the rest of the spec on their device -> the loader interface."""
    x = augment(u8.permute(0, 3, 1, 2).float().div_(255), aug, image_size, gen)
    return normalize(x, channels_last)


def normalize(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """Float [B, 3, H, W] in [0, 1] -> ImageNet-normalised float32, channels-last (the loader interface)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return ((x.float() - mean) / std).contiguous(memory_format=fmt)


def normalize_uint8_nhwc(x: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float32 [B, 3, H, W] in one fused pass (no NCHW copy of the uint8)."""
    scale = torch.tensor([1 / (255 * s) for s in IMAGENET_STD], device=x.device, dtype=torch.float32)
    shift = torch.tensor([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], device=x.device, dtype=torch.float32)
    y = x.float().mul_(scale).sub_(shift)  # in place on the fresh float copy: one allocation
    y = y.permute(0, 3, 1, 2)  # a channels-last NCHW view of the NHWC data
    return y if channels_last else y.contiguous()
