"""The MoCo augmentation recipes as data, so every loader backend reads the same spec and none can drift.

MoCo v1 ("A"): RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.4), RandomGrayscale 0.2, flip.
MoCo v2 ("B", aug-plus): RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8,
RandomGrayscale 0.2, GaussianBlur sigma 0.1-2 p 0.5, flip. The order of the steps is the order applied.
The blur is MoCo's own: PIL's GaussianBlur with radius = sigma, in pixels of the cropped view (not
torchvision's tensor GaussianBlur, 6x slower at 224 and truncated to its kernel size). The executors repeat PIL's
arithmetic exactly (pil_box_blur: its box radius and fixed-point weights; the passes are theirs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import ImageFilter
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Step:
    name: str  # random_resized_crop | color_jitter | grayscale | gaussian_blur | horizontal_flip
    p: float = 1.0  # probability the step is applied
    params: dict = field(default_factory=dict)


CROP = Step("random_resized_crop", params={"scale": (0.2, 1.0), "ratio": (3 / 4, 4 / 3)})
FLIP = Step("horizontal_flip", p=0.5)
GRAY = Step("grayscale", p=0.2)

AUG_SPECS: dict[str, tuple[Step, ...]] = {
    "mocov1": (  # the authors' "A" (dataset/util.py): jitter, then grayscale (the two do not commute)
        CROP,
        Step("color_jitter", params={"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.4}),
        GRAY,
        FLIP,
    ),
    "mocov2": (
        CROP,
        Step("color_jitter", p=0.8, params={"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}),
        GRAY,
        Step("gaussian_blur", p=0.5, params={"sigma": (0.1, 2.0)}),
        FLIP,
    ),
    # MoCo v2 without the blur, for images of 32 pixels and less: FAIR's CIFAR-10 MoCo demo and SimCLR's CIFAR
    # recipe leave it out. Its sigma is in pixels of the view (0.1-2 is mild at 224; at 16 it erases a digit).
    "cifar": (
        CROP,
        Step("color_jitter", p=0.8, params={"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}),
        GRAY,
        FLIP,
    ),
}


def crop_step(aug: str, min_scale: float = 0.0) -> Step:
    """The recipe's RandomResizedCrop; `min_scale` > 0 replaces its smallest area share (loader.crop_scale_min)."""
    crop = AUG_SPECS[aug][0]
    return crop if min_scale <= 0 else Step(crop.name, crop.p, {**crop.params, "scale": (min_scale, 1.0)})


BLUR_SIGMA_MAX = 2.0  # the largest sigma of any recipe here (MoCo v2's 0.1-2)
# PIL's GaussianBlur: this many box passes along x, then as many along y, each rounded to 8 bits.
PIL_BLUR_PASSES = 3
PIL_BLUR_ONE = 1 << 24  # PIL's fixed point: a box's weights are integers out of 2^24


def blur_kernel_size(image_size: int, sigma_max: float = BLUR_SIGMA_MAX) -> int:
    """Taps spanned by PIL's blur at sigma_max: three box passes of radius l + a span 6 l + 7 taps, with
    l = floor((sqrt(4 sigma^2 + 1) - 1) / 2) (13 at sigma 2), capped at 2 * image_size - 1. The executors'
    box passes need no cap (they clamp at the borders, as PIL does); their kernels still take it as an argument."""
    taps = 6 * math.floor((math.sqrt(4 * sigma_max ** 2 + 1) - 1) / 2) + 7
    return max(1, min(taps, 2 * image_size - 1))


def pil_box_blur(sigma: float) -> tuple[int, int, int]:
    """PIL's GaussianBlur(radius=sigma) as one box pass, (r, ww, fw), that PIL repeats PIL_BLUR_PASSES times along
    x, then along y, writing 8-bit values each time:

        out[x] = (ww * (in[x - r] + ... + in[x + r]) + fw * (in[x - r - 1] + in[x + r + 1]) + 2^23) >> 24

    with indices clamped to the image (its edge pixels extend it). The box has radius l + a (Gwosdek et al. 2011,
    the extended box: l whole taps on each side and one of weight a at each end; r = l) so that the passes have
    variance sigma^2. Computed in float32 as PIL's C does (its radius is a C float): in float64, ww differs by
    one in ~40% of the draws of U(0.1, 2). Written with numpy scalars so that color_numba can compile it too
    (without fastmath, which would reorder the float32 operations)."""
    f = np.float32
    s2 = f(sigma) * f(sigma) / f(PIL_BLUR_PASSES)
    length = f(np.sqrt(12.0 * np.float64(s2) + 1.0))  # the box length for that variance
    l = f(np.floor((np.float64(length) - 1.0) / 2.0))  # noqa: E741 (the paper's name)
    a = (f(2.0) * l + f(1.0)) * (l * (l + f(1.0)) - f(3.0) * s2) / (f(6.0) * (s2 - (l + f(1.0)) * (l + f(1.0))))
    radius = l + a
    ww = int(f(PIL_BLUR_ONE) / (radius * f(2.0) + f(1.0)))  # truncated, as C's conversion to an integer
    r = int(radius)
    return r, ww, (PIL_BLUR_ONE - (2 * r + 1) * ww) // 2


class PILGaussianBlur:
    """MoCo's GaussianBlur (moco/loader.py): PIL's ImageFilter.GaussianBlur, radius = sigma ~ U(sigma range).

    sigma comes from torch's generator, as in torchvision's own transforms (seeded per DataLoader worker)."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img):
        radius = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def _torchvision_step(step: Step, image_size: int) -> torch.nn.Module:
    p = step.params
    if step.name == "random_resized_crop":
        return T.RandomResizedCrop(image_size, scale=p["scale"], ratio=p["ratio"])
    if step.name == "horizontal_flip":
        return T.RandomHorizontalFlip(step.p)
    if step.name == "grayscale":
        return T.RandomGrayscale(step.p)
    if step.name == "color_jitter":
        t = T.ColorJitter(p["brightness"], p["contrast"], p["saturation"], p["hue"])
    elif step.name == "gaussian_blur":
        t = PILGaussianBlur(p["sigma"])
    else:
        raise ValueError(f"unknown augmentation step {step.name!r}")
    return t if step.p >= 1.0 else T.RandomApply([t], p=step.p)


def torchvision_train_transform(aug: str, image_size: int, crop_scale_min: float = 0.0) -> T.Compose:
    """The reference semantics: torchvision transforms on PIL images, then ToTensor + ImageNet normalisation."""
    steps = [_torchvision_step(s, image_size) for s in (crop_step(aug, crop_scale_min), *AUG_SPECS[aug][1:])]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def linear_spec(crop_scale_min: float = 0.0) -> tuple[Step, ...]:
    """Linear-probe training augmentation (MoCo's main_lincls): RandomResizedCrop + flip, no colour ops.
    `crop_scale_min`: the crop's smallest area share; 0 = main_lincls's 0.08."""
    scale = (crop_scale_min if crop_scale_min > 0 else 0.08, 1.0)
    return (Step("random_resized_crop", params={"scale": scale, "ratio": (3 / 4, 4 / 3)}), FLIP)


def torchvision_linear_transform(image_size: int, crop_scale_min: float = 0.0) -> T.Compose:
    steps = [_torchvision_step(s, image_size) for s in linear_spec(crop_scale_min)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def torchvision_eval_transform(image_size: int, crop_ratio: float = 0.875) -> T.Compose:
    """Resize(size / ratio) then CenterCrop(size): 256 -> 224 at the default ratio."""
    return T.Compose([
        T.Resize(round(image_size / crop_ratio)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class TwoViews:
    """Two independently augmented views of one image."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), self.transform(img)
