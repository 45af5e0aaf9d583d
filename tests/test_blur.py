"""The blur of both executors (batch_augment's torch ops, color_numba's kernel) against MoCo's own, PIL's
ImageFilter.GaussianBlur(radius=sigma) on a uint8 RGB image: equal to the level, pixel for pixel.

PIL blurs with three passes of an extended box along the rows, then three down the columns, each pass rounded to
8 bits (augment.pil_box_blur); a single float kernel rounded once (the executors' blur before) missed it by up to
50 levels near the borders and changed many pixels of smooth content that PIL leaves as they are.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from fastft.pipelines import batch_augment
from fastft.pipelines.augment import PILGaussianBlur, blur_kernel_size, pil_box_blur

SIZES = [(17, 29), (40, 9), (64, 48), (1, 6)]  # (height, width): non-square, thin, one row
# MoCo v2 draws sigma ~ U(0.1, 2): the ends, both box radii (r = 0 below sqrt 2, 1 above), random draws (as
# float32, the executors' draws); 3.0 has r = 2, beyond the recipes' range.
SIGMAS = [0.1, 0.6, 1.0, 2.0, *(float(s) for s in np.random.default_rng(7).uniform(0.1, 2.0, 4).astype(np.float32)),
          3.0]


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """Slow waves over a gradient: neighbouring pixels differ by a few levels, as in sky or skin."""
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    y, x = np.mgrid[0:h, 0:w]
    planes = [128 + 60 * np.sin(x / (7 + 5 * c) + phase[c]) * np.cos(y / (9 + 3 * c)) + 0.4 * x for c in range(3)]
    return np.clip(np.stack(planes, axis=-1), 0, 255).round().astype(np.uint8)


IMAGES = {"random": [random_image(h, w, k) for k, (h, w) in enumerate(SIZES)],
          "smooth": [smooth_image(h, w, k) for k, (h, w) in enumerate(SIZES)]}


def pil_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)))


def torch_blur(imgs: np.ndarray, sigmas: list[float]) -> np.ndarray:
    """uint8 [B, H, W, 3], one sigma each, through the torch executor's blur (on [0, 1] floats, as it runs)."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    y = batch_augment.gaussian_blur(x, torch.tensor(sigmas, dtype=torch.float32))
    return (y * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def numba_view(img: np.ndarray, sigma: float, grey: bool = False, blur: bool = True) -> np.ndarray:
    """One view through the numba kernel with only the blur (and grayscale if `grey`) switched on."""
    pytest.importorskip("numba")
    from fastft.pipelines import color_numba as cn
    prm = np.zeros(cn.PARAMS, np.float32)
    prm[cn.P_SIGMA] = sigma
    prm[cn.P_BLUR] = float(blur)
    prm[cn.P_GRAY] = float(grey)
    out = np.empty_like(img)
    cn.kernels()[1](img, out, prm, cn.program("mocov2"), blur_kernel_size(min(img.shape[:2])))
    return out


def off_by(got: np.ndarray, want: np.ndarray) -> str:
    d = np.abs(got.astype(int) - want)
    return f"max |diff| {d.max()} levels, {(d > 0).mean():.4%} of the values differ"


def test_the_box_of_pils_gaussian_blur():
    """sigma 2: variance 4/3 per pass, box radius l + a = 1 + 0.375, weights of 2^24 / 3.75 and the rest split
    between the two end taps."""
    assert pil_box_blur(2.0) == (1, 4473924, 1677722)
    for sigma in SIGMAS:
        r, ww, fw = pil_box_blur(sigma)
        assert 0 <= (1 << 24) - (2 * r + 1) * ww - 2 * fw <= 1 and 0 < fw < ww
    assert [pil_box_blur(s)[0] for s in (1.41, 1.42, 2.44, 2.46)] == [0, 1, 1, 2]  # r steps at sqrt 2, sqrt 6


def test_the_reference_is_pils_gaussian_blur():
    """The torchvision reference blurs with PIL's GaussianBlur itself, radius = the sigma it draws."""
    img = Image.fromarray(random_image(20, 30, 1))
    torch.manual_seed(3)
    got = np.asarray(PILGaussianBlur((0.1, 2.0))(img))
    torch.manual_seed(3)
    radius = float(torch.empty(1).uniform_(0.1, 2.0))
    assert np.array_equal(got, np.asarray(img.filter(ImageFilter.GaussianBlur(radius=radius))))


@pytest.mark.parametrize("content", ["random", "smooth"])
@pytest.mark.parametrize("sigma", SIGMAS, ids=lambda s: f"{s:.3f}")
def test_both_executors_blur_exactly_as_pil(sigma, content):
    for img in IMAGES[content]:
        want = pil_blur(img, sigma)
        by_torch, by_numba = torch_blur(img[None], [sigma])[0], numba_view(img, sigma)
        assert np.array_equal(by_torch, want), f"torch, {img.shape}: {off_by(by_torch, want)}"
        assert np.array_equal(by_numba, want), f"numba, {img.shape}: {off_by(by_numba, want)}"


def test_the_torch_executor_blurs_each_image_with_its_own_sigma():
    """One batch, one sigma per image, box radii 0, 1 and 2 mixed (the executor groups images by radius)."""
    imgs = np.stack([random_image(23, 31, 10 + k) for k in range(6)])
    sigmas = [1.9, 0.3, 2.7, 1.2, 0.7, 1.5]
    got = torch_blur(imgs, sigmas)
    for img, sigma, out in zip(imgs, sigmas, got):
        want = pil_blur(img, sigma)
        assert np.array_equal(out, want), f"sigma {sigma}: {off_by(out, want)}"


def test_the_numba_kernel_blurs_a_grey_view_as_pil():
    """Grayscale then blur: the kernel blurs one plane of a grey view and copies it; PIL blurs the grey image."""
    img = smooth_image(30, 20, 5) // 2 + random_image(30, 20, 6) // 2
    grey = numba_view(img, 1.0, grey=True, blur=False)
    assert np.array_equal(numba_view(img, 1.7, grey=True), pil_blur(grey, 1.7))


@pytest.mark.parametrize("sigma", [0.6, 1.0])
def test_small_sigmas_leave_smooth_content_as_pil_leaves_it(sigma):
    """PIL's rounding after every pass leaves smooth content nearly as it was at small sigmas (here 0.03% of the
    values change at 0.6, 1.6% at 1.0): the executors change exactly the same values (one float kernel rounded
    once, their blur before, changed 3.5% of them at 0.6 and 22% at 1.0)."""
    imgs = np.stack([smooth_image(48, 64, k) for k in range(3)])
    want = np.stack([pil_blur(img, sigma) for img in imgs]) != imgs
    assert want.mean() < 0.02
    by_torch = torch_blur(imgs, [sigma] * 3) != imgs
    by_numba = np.stack([numba_view(img, sigma) for img in imgs]) != imgs
    assert np.array_equal(by_torch, want) and np.array_equal(by_numba, want), (want.mean(), by_torch.mean(),
                                                                             by_numba.mean())
