"""The augmentation spec (augment.py) as batched tensor ops: any device, per-sample random parameters.

One of the two executors of the steps after the crop for the dali and ffcv backends (`color_ops: torch`; the
other is the numba kernels of color_numba.py, on the CPU): it runs after a loader that only decodes and
crops, on the training device, where on a GPU these ops are nearly free. This docstring is the statement of
the colour semantics that both executors implement. They are torchvision's (the reference):

- color_jitter: brightness, contrast, saturation and hue in a random order per image (torchvision draws
  `randperm(4)` per call); brightness/contrast/saturation factors ~ U[max(0, 1 - x), 1 + x], hue ~ U[-h, h];
  contrast blends with the image's mean grey, saturation with its own grey (ITU-R 601 luma, as PIL's "L");
  hue shifts the HSV hue; the result is clipped to [0, 1] after every op.
- grayscale: luma in all three channels. gaussian_blur: MoCo's (PIL's GaussianBlur, radius = sigma ~
  U[sigma_min, sigma_max]): three box passes of fractional radius, as one separable kernel (pil_blur_kernels),
  reflect padding. horizontal_flip: mirror.
Each step is applied with its probability `p`, independently per image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .augment import AUG_SPECS, IMAGENET_MEAN, IMAGENET_STD, Step, blur_kernel_size

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


def pil_blur_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """[B] sigmas -> [B, size] 1-D kernels of PIL's GaussianBlur(radius=sigma), centred: three passes of a box of
    radius l + a (l whole taps, the two end taps weighted a), with l and a chosen so that the three passes have
    variance sigma^2 (Gwosdek et al. 2011, as PIL's ImagingGaussianBlur). Cut to `size` taps (renormalised)."""
    s2 = sigma.double() ** 2 / 3
    l = torch.floor((torch.sqrt(12 * s2 + 1) - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    half = size // 2
    t = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float64).abs()[None, :]
    box = torch.where(t <= l[:, None], 1.0, torch.where(t == l[:, None] + 1, a[:, None], 0.0))
    box = box / (2 * l + 1 + 2 * a)[:, None]  # [B, size]
    b = box.shape[0]
    k = box
    for _ in range(2):  # box * box * box, each convolution cut to `size` taps around the centre
        k = F.conv1d(k[None], box.flip(-1)[:, None], padding=half, groups=b)[0]
    return (k / k.sum(dim=1, keepdim=True)).float()


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """MoCo's (PIL's) blur with one sigma per image, as a separable kernel; reflect padding."""
    b, c, h, w = x.shape
    k = pil_blur_kernels(sigma, size).repeat_interleave(c, dim=0)  # [B*C, size]
    pad = size // 2
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k.view(b * c, 1, 1, size), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k.view(b * c, 1, size, 1), groups=b * c)
    return y.view(b, c, h, w)


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
            x = _apply_to(x, apply, lambda v, s: gaussian_blur(v, s, blur_kernel_size(image_size)),
                          _uniform(n, lo, hi, gen))
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
