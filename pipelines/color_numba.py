"""The post-crop steps of the augmentation spec as numba kernels on one uint8 HWC view.

One of the two executors of those steps for the dali and ffcv backends (`color_ops: numba`; the other is
batch_augment.py, whose docstring states the semantics both implement). Computed in float32 (the blur's
fixed-point sums in float64, exact) on the CPU inside the loader's threads: FFCV runs them as a jitted pipeline
stage, so the colour ops overlap decoding and never touch the Python interpreter; DALI's loader runs them on each
batch of cropped views. numba arrives with the `dali` and `ffcv` extras; this module imports it on first use.

A view's random draws are one row of PARAMS floats (drawn by `draw_params`); `program` lists the step codes
in spec order, so MoCo v1 (grayscale before jitter) and v2 (jitter before grayscale) share one kernel.
"""
from __future__ import annotations

import numpy as np

from .augment import AUG_SPECS, IMAGENET_MEAN, IMAGENET_STD, PIL_BLUR_ONE, blur_kernel_size, pil_box_blur

JITTER, GRAY, BLUR, FLIP = 1, 2, 3, 4
_CODES = {"color_jitter": JITTER, "grayscale": GRAY, "gaussian_blur": BLUR, "horizontal_flip": FLIP}
# Row layout of one view's parameters.
P_JITTER, P_B, P_C, P_S, P_H, P_ORDER, P_GRAY, P_BLUR, P_SIGMA, P_FLIP = 0, 1, 2, 3, 4, 5, 9, 10, 11, 12
PARAMS = 13
# PIL's rounding of a box pass's fixed-point sum: + 2^23, then >> 24.
HALF, INV_ONE = float(PIL_BLUR_ONE // 2), 1.0 / PIL_BLUR_ONE


def program(aug: str) -> np.ndarray:
    """Step codes after the crop, in spec order."""
    return np.array([_CODES[s.name] for s in AUG_SPECS[aug][1:]], dtype=np.int64)


def step_table(aug: str) -> np.ndarray:
    """[probability, a, b, c, d] per step code (index = code): what draw_params samples from, as plain numbers
    so a jitted function can take it as an argument."""
    table = np.zeros((5, 5), dtype=np.float64)
    for s in AUG_SPECS[aug][1:]:
        code = _CODES[s.name]
        table[code, 0] = s.p
        if s.name == "color_jitter":
            table[code, 1:5] = [s.params["brightness"], s.params["contrast"], s.params["saturation"], s.params["hue"]]
        elif s.name == "gaussian_blur":
            table[code, 1:3] = s.params["sigma"]
    return table


def draw_params_np(n: int, table: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n, PARAMS] random draws for n views (numpy; the jitted twin is `draw_params` below)."""
    out = np.zeros((n, PARAMS), dtype=np.float32)
    j = table[JITTER]
    out[:, P_JITTER] = rng.random(n) < j[0]
    for col, mag in ((P_B, j[1]), (P_C, j[2]), (P_S, j[3])):
        out[:, col] = rng.uniform(max(0.0, 1 - mag), 1 + mag, n)
    out[:, P_H] = rng.uniform(-j[4], j[4], n)
    out[:, P_ORDER:P_ORDER + 4] = np.argsort(rng.random((n, 4)), axis=1)
    out[:, P_GRAY] = rng.random(n) < table[GRAY, 0]
    out[:, P_BLUR] = rng.random(n) < table[BLUR, 0]
    out[:, P_SIGMA] = rng.uniform(table[BLUR, 1], table[BLUR, 2], n) if table[BLUR, 0] > 0 else 1.0
    out[:, P_FLIP] = rng.random(n) < table[FLIP, 0]
    return out


def _kernels():
    """Compile on first use (numba is optional, and compiling costs seconds)."""
    import numba

    jit = numba.njit(cache=True, fastmath=True, nogil=True)  # cached on disk: compiling costs seconds

    @jit
    def draw_params(table, out):
        for i in range(out.shape[0]):
            j = table[JITTER]
            out[i, P_JITTER] = 1.0 if np.random.random() < j[0] else 0.0
            for col, k in ((P_B, 1), (P_C, 2), (P_S, 3)):
                lo = max(0.0, 1.0 - j[k])
                out[i, col] = lo + (1.0 + j[k] - lo) * np.random.random()
            out[i, P_H] = -j[4] + 2.0 * j[4] * np.random.random()
            perm = np.argsort(np.random.random(4))
            for q in range(4):
                out[i, P_ORDER + q] = perm[q]
            out[i, P_GRAY] = 1.0 if np.random.random() < table[GRAY, 0] else 0.0
            out[i, P_BLUR] = 1.0 if np.random.random() < table[BLUR, 0] else 0.0
            out[i, P_SIGMA] = table[BLUR, 1] + (table[BLUR, 2] - table[BLUR, 1]) * np.random.random()
            out[i, P_FLIP] = 1.0 if np.random.random() < table[FLIP, 0] else 0.0

    # The image lives in three float planes [3, h*w] so that every op is a loop over contiguous floats that
    # LLVM vectorises (a per-pixel interpreter of the op chain ran ~10x slower). Each op clips to [0, 255]
    # like torchvision's, and branches are written as selects so the hue loop vectorises too.
    @jit
    def brightness(x, f):
        for c in range(3):
            xc = x[c]
            for p in range(xc.shape[0]):
                xc[p] = min(255.0, f * xc[p])

    @jit
    def mean_grey(x):
        acc = np.float32(0.0)
        r, g, b = x[0], x[1], x[2]
        for p in range(r.shape[0]):
            acc += np.float32(0.299) * r[p] + np.float32(0.587) * g[p] + np.float32(0.114) * b[p]
        return acc / r.shape[0]

    @jit
    def blend(x, f, towards_grey_of_pixel, const):
        """x <- clip(f x + (1 - f) y), y = the pixel's own grey (saturation) or `const` (contrast's mean)."""
        r, g, b = x[0], x[1], x[2]
        for p in range(r.shape[0]):
            y = np.float32(0.299) * r[p] + np.float32(0.587) * g[p] + np.float32(0.114) * b[p] \
                if towards_grey_of_pixel else const
            base = (1.0 - f) * y
            r[p] = min(255.0, max(0.0, f * r[p] + base))
            g[p] = min(255.0, max(0.0, f * g[p] + base))
            b[p] = min(255.0, max(0.0, f * b[p] + base))

    @jit
    def grayscale(x):
        r, g, b = x[0], x[1], x[2]
        for p in range(r.shape[0]):
            y = np.float32(0.299) * r[p] + np.float32(0.587) * g[p] + np.float32(0.114) * b[p]
            r[p] = y
            g[p] = y
            b[p] = y

    @jit
    def _wrap6(t):
        return t - np.float32(6.0) * np.floor(t * np.float32(1.0 / 6.0))

    @jit
    def _channel(vmax, chroma, t):
        return vmax - chroma * min(np.float32(1.0), max(np.float32(0.0), min(t, np.float32(4.0) - t)))

    @jit
    def hue(x, h):
        r, g, b = x[0], x[1], x[2]
        shift = np.float32(6.0 * h)
        for p in range(r.shape[0]):
            rp, gp, bp = r[p], g[p], b[p]
            vmax = max(rp, max(gp, bp))
            chroma = vmax - min(rp, min(gp, bp))
            inv = np.float32(1.0) / max(chroma, np.float32(1e-12))
            hue6 = (gp - bp) * inv if vmax == rp else ((bp - rp) * inv + np.float32(2.0) if vmax == gp
                                                       else (rp - gp) * inv + np.float32(4.0))
            hue6 += shift  # a grey pixel (chroma 0) comes out unchanged whatever its hue6
            r[p] = _channel(vmax, chroma, _wrap6(hue6 + np.float32(5.0)))
            g[p] = _channel(vmax, chroma, _wrap6(hue6 + np.float32(3.0)))
            b[p] = _channel(vmax, chroma, _wrap6(hue6 + np.float32(1.0)))

    box = numba.njit(cache=True, nogil=True)(pil_box_blur)  # no fastmath: PIL's float32 steps, in its order

    @jit
    def add(dst, src):
        """dst += src over contiguous floats: a function of its own, so that LLVM vectorises the loop (inlined into
        the blur's loops it did not, and the blur ran 3.6x slower)."""
        for j in range(dst.shape[0]):
            dst[j] += src[j]

    @jit
    def level(window, ends, ww, fw):
        """A box pass's 8-bit output in PIL's fixed point, (ww window + fw ends + 2^23) >> 24, from the integer sums
        of its window and of its two end taps. In float64, where every term (an integer below 2^32) is exact:
        float32 products would round before PIL's rounding does (an exact float32 form, batch_augment.box_pass's,
        ran these loops 1.6x slower)."""
        return np.float32(np.floor((ww * np.float64(window) + fw * np.float64(ends) + HALF) * INV_ONE))

    @jit
    def slide(dst, acc, new, lo, hi, ww, fw):
        """One row of a box pass down the rows: the window sum `acc` slides by a row (+ new, - lo: the end taps'
        rows lo and hi are the rows just outside it), then dst = its level. Integer levels in float32: exact."""
        for j in range(dst.shape[0]):
            a = acc[j] + new[j] - lo[j]
            acc[j] = a
            dst[j] = level(a, lo[j] + hi[j], ww, fw)

    @jit
    def box_pass(src, dst, r, ww, fw, acc):
        """PIL's box pass along the first axis of src [n, m] into dst (another array), whole rows at a time: row i
        is the box over rows i - r - 1 .. i + r + 1 of src, indices clamped to [0, n) (PIL's edge pixels extend
        the image)."""
        n, first = src.shape[0], src[0]
        for j in range(acc.shape[0]):  # the window of row -1: row 0 r + 1 times, then rows 0 .. r - 1
            acc[j] = (r + 1) * first[j]
        for k in range(r):
            add(acc, src[min(k, n - 1)])
        for i in range(n):
            slide(dst[i], acc, src[min(i + r, n - 1)], src[max(i - r - 1, 0)], src[min(i + r + 1, n - 1)], ww, fw)

    @jit
    def three_passes(src, spare, spare2, dst, r, ww, fw, acc):
        """PIL's three box passes (augment.PIL_BLUR_PASSES) from src into dst, through spare and spare2: spare may be
        dst and spare2 may be src, as no pass then reads the array it writes."""
        box_pass(src, spare, r, ww, fw, acc)
        box_pass(spare, spare2, r, ww, fw, acc)
        box_pass(spare2, dst, r, ww, fw, acc)

    @jit
    def transpose(dst, src):
        """dst [w, h] = src [h, w] transposed, 8 rows of src at a time (each row of dst is then written 8 contiguous
        floats at a time): 2.5x faster than element by element."""
        h, w = src.shape
        i0 = 0
        while i0 + 8 <= h:
            for j in range(w):
                d = dst[j]
                for i in range(i0, i0 + 8):
                    d[i] = src[i, j]
            i0 += 8
        for i in range(i0, h):
            for j in range(w):
                dst[j, i] = src[i, j]

    @jit
    def quantise(xc):
        """The plane's 8-bit levels (those to_uint8 writes): PIL blurs an 8-bit image."""
        for p in range(xc.shape[0]):
            xc[p] = np.floor(min(np.float32(255.0), max(np.float32(0.0), xc[p])) + np.float32(0.5))

    @jit
    def blur(x, h, w, sigma, planes):
        """MoCo's blur, PIL's GaussianBlur(radius=sigma) to the level: the box passes of augment.pil_box_blur on each
        plane's 8-bit levels, along the rows, then down the columns, each pass rounded to 8 bits as PIL's are.
        Every pass runs down the rows of its array (whole contiguous rows, a sliding window), so the row passes
        run on the plane transposed. planes = 1: the view is grey (three equal planes), one is blurred and copied."""
        r, ww_int, fw_int = box(sigma)
        ww, fw = np.float64(ww_int), np.float64(fw_int)
        acc = np.empty(max(h, w), dtype=np.float32)
        one, two = np.empty(h * w, dtype=np.float32), np.empty(h * w, dtype=np.float32)
        across, down = (one.reshape(w, h), two.reshape(w, h)), (one.reshape(h, w), two.reshape(h, w))
        for c in range(planes):
            quantise(x[c])
            xc = x[c].reshape(h, w)
            transpose(across[0], xc)
            three_passes(across[0], across[1], across[0], across[1], r, ww, fw, acc[:h])
            transpose(xc, across[1])
            three_passes(xc, down[0], down[1], xc, r, ww, fw, acc[:w])
        for c in range(planes, 3):
            x[c, :] = x[0]

    @jit
    def to_uint8(v):
        return np.uint8(min(np.float32(255.0), max(np.float32(0.0), v)) + np.float32(0.5))

    @jit
    def augment_view(src, dst, prm, prog, blur_size):
        """uint8 HWC src -> dst (may be src) through the steps of `prog`, with the draws in `prm`. `blur_size`
        (blur_kernel_size) is no longer used: PIL's box passes need no kernel size (the callers still pass it)."""
        h, w = src.shape[0], src.shape[1]
        x = np.empty((3, h * w), dtype=np.float32)
        s, r, g, b = src.reshape(-1), x[0], x[1], x[2]
        for p in range(h * w):  # plane by plane over the flat pixels: 6x faster than an (i, j, c) nest
            r[p] = s[3 * p]
            g[p] = s[3 * p + 1]
            b[p] = s[3 * p + 2]
        flip = grey = False  # grey: the three planes are equal (grayscale, and no jitter since)
        for code in prog:
            if code == JITTER and prm[P_JITTER] > 0.5:
                grey = False
                for q in range(4):
                    op = int(prm[P_ORDER + q])
                    f = np.float32(prm[P_B + op])
                    if op == 0:
                        brightness(x, f)
                    elif op == 1:
                        blend(x, f, False, mean_grey(x))  # torchvision's pivot: the image's mean grey
                    elif op == 2:
                        blend(x, f, True, np.float32(0.0))
                    else:
                        hue(x, f)
            elif code == GRAY and prm[P_GRAY] > 0.5:
                grayscale(x)
                grey = True
            elif code == BLUR and prm[P_BLUR] > 0.5:
                blur(x, h, w, prm[P_SIGMA], 1 if grey else 3)
            elif code == FLIP and prm[P_FLIP] > 0.5:
                flip = True
        for i in range(h):  # the flip's branch outside the loops, which then vectorise
            d, base = dst[i].reshape(-1), i * w
            if flip:
                end = base + w - 1
                for j in range(w):
                    d[3 * j], d[3 * j + 1], d[3 * j + 2] = \
                        to_uint8(r[end - j]), to_uint8(g[end - j]), to_uint8(b[end - j])
            else:
                for j in range(w):
                    d[3 * j], d[3 * j + 1], d[3 * j + 2] = \
                        to_uint8(r[base + j]), to_uint8(g[base + j]), to_uint8(b[base + j])

    @jit
    def seed(s):
        np.random.seed(s)  # numba's generator of the calling thread, which is the one draw_params uses

    @numba.njit(cache=True, fastmath=True, nogil=True, parallel=True)
    def augment_batch(views, table, prog, blur_size):
        """In place on uint8 [B, H, W, 3], one independent draw per view, views spread over numba's threads."""
        prm = np.empty((views.shape[0], PARAMS), dtype=np.float32)
        draw_params(table, prm)
        for i in numba.prange(views.shape[0]):
            augment_view(views[i], views[i], prm[i], prog, blur_size)

    return draw_params, augment_view, augment_batch, seed


_COMPILED = None


def kernels():
    """(draw_params, augment_view, augment_batch, seed), compiled once per process."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = _kernels()
    return _COMPILED


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def seed(value: int) -> None:
    """Seed the draws of augment_batch calls made from this thread."""
    kernels()[3](value % (2 ** 32))


def augment_batch(views: np.ndarray, aug: str, image_size: int, threads: int = 0) -> None:
    """The spec's post-crop steps on uint8 [B, H, W, 3] in place, in parallel (numba threads)."""
    import numba

    if threads > 0:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    kernels()[2](views, step_table(aug), program(aug), blur_kernel_size(image_size))


_NORMALIZE = None
# x / 255 then (x - mean) / std as one multiply-subtract per channel (the arithmetic of
# batch_augment.normalize_uint8_nhwc).
_SCALE = np.array([1 / (255 * s) for s in IMAGENET_STD], dtype=np.float32)
_SHIFT = np.array([m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], dtype=np.float32)


def _normalize_kernel():
    import numba

    @numba.njit(cache=True, fastmath=True, nogil=True, parallel=True)
    def normalize_views(src, dst, scale, shift):
        # One row of per-value factors (r g b r g b ...), so that each image row is one contiguous loop that
        # vectorises: 2x faster than three strided statements per pixel.
        w3 = src.shape[2] * 3
        row_scale, row_shift = np.empty(w3, dtype=np.float32), np.empty(w3, dtype=np.float32)
        for q in range(w3):
            row_scale[q], row_shift[q] = scale[q % 3], shift[q % 3]
        for i in numba.prange(src.shape[0]):
            for r in range(src.shape[1]):
                s, d = src[i, r].reshape(-1), dst[i, r].reshape(-1)
                for q in range(w3):
                    d[q] = s[q] * row_scale[q] - row_shift[q]

    return normalize_views


def normalize(u8, channels_last: bool = True):
    """uint8 [B, H, W, 3] CPU tensor -> ImageNet-normalised float32 [B, 3, H, W] (a channels-last view of NHWC
    memory), in numba's threads: the loader interface, as batch_augment.normalize_uint8_nhwc makes it on any
    device, about 3x faster than those torch ops on the CPU (one pass into a fresh numpy buffer)."""
    import torch

    global _NORMALIZE
    if _NORMALIZE is None:
        _NORMALIZE = _normalize_kernel()
    src = np.ascontiguousarray(u8.numpy())
    out = np.empty(src.shape, dtype=np.float32)
    _NORMALIZE(src, out, _SCALE, _SHIFT)
    x = torch.from_numpy(out).permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def augment_views_np(views: np.ndarray, aug: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, H, W, 3] -> augmented copy, serially (tests and tools; loaders call the kernel themselves)."""
    augment_view = kernels()[1]
    prm = draw_params_np(len(views), step_table(aug), rng)
    out = np.empty_like(views)
    prog = program(aug)
    for i in range(len(views)):
        augment_view(views[i], out[i], prm[i], prog, blur_kernel_size(image_size))
    return out


__all__ = ["program", "step_table", "draw_params_np", "kernels", "seed", "augment_batch", "augment_views_np", "normalize",
           "PARAMS"]
