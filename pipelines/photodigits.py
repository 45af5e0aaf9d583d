"""`builtin:photodigits`: handwritten digits composited onto patches of real photographs, labelled by the digit.

The label is a shape; everything else is nuisance: the background is a patch of one of the photographs that
`builtin:scenes` uses (scenes.SOURCES), and the digit sits at a random place, at a random scale and in a random
colour. Instance discrimination can tell two images apart by their backgrounds alone, so this is the data on which
a contrastive recipe shows whether it learns the shape or the texture around it (MNIST-M is the same idea).

Fixed before any training run looked at it (the recipe is tuned on the data, never the data on the recipe):
- digits: scikit-learn's 1,797 8x8 digits, split as `builtin:digits` (80/20 stratified, seed 0), so **train and
  val digits are different handwriting samples**;
- backgrounds: each photograph cut into the 4 x 4 grid of tiles that `builtin:scenes` uses, with the same val
  tiles, so **train and val backgrounds share no pixel**; a background is a square of 50-100% of a tile's shorter
  side at a random place, resized (antialiased) to SIZE x SIZE, randomly mirrored;
- the glyph: upscaled (bilinear) to a side of 50-85% of SIZE, at a uniform random position fully inside the frame,
  alpha = its ink (0..16 -> 0..1), in a uniform random RGB colour whose luminance differs by at least
  MIN_CONTRAST from the background's under the glyph (redrawn until it does, so every digit is visible);
- COPIES composites per digit, each with its own background, place, scale and colour.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .scenes import SOURCES, rgb, split_tiles, tiles

SIZE = 32
COPIES = 3
SCALE = (0.5, 0.85)  # glyph side as a share of SIZE
MIN_CONTRAST = 80.0  # luminance difference, 0..255, between the glyph's colour and the background under it
SEED = 0
_LUMA = np.array([0.299, 0.587, 0.114])


Tile = tuple[int, int, int, int]  # top, left, height, width


def background_pool(val: bool, seed: int = SEED) -> list[tuple[int, np.ndarray, Tile]]:
    """(photograph index, photograph, tile) triples backgrounds are cut from: the val tiles of each photograph, or
    its train tiles. The tiles are those of builtin:scenes (the same seed per photograph), so the two datasets
    agree on which parts of a photograph are val."""
    pool = []
    for k, load in enumerate(SOURCES.values()):
        photo = rgb(load())
        train, val_tiles = split_tiles(np.random.default_rng([seed, k]))
        grid = tiles(photo.shape[:2])
        pool += [(k, photo, grid[t]) for t in (val_tiles if val else train)]
    return pool


def background(pool: list, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A size x size x 3 float patch: a random square of 50-100% of a random tile's shorter side."""
    from PIL import Image

    _, photo, (top, left, th, tw) = pool[int(rng.integers(len(pool)))]
    side = max(1, int(round(min(th, tw) * rng.uniform(0.5, 1.0))))
    y, x = top + int(rng.integers(0, th - side + 1)), left + int(rng.integers(0, tw - side + 1))
    img = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR, reducing_gap=None)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, dtype=np.float64)


def glyph(digit: np.ndarray, side: int) -> np.ndarray:
    """The 8x8 digit (uint8, 0..255) upscaled to side x side as an alpha mask in [0, 1]."""
    from PIL import Image

    return np.asarray(Image.fromarray(digit).resize((side, side), Image.BILINEAR), dtype=np.float64) / 255.0


def composite(digit: np.ndarray, bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`digit` drawn onto `bg` (float HxWx3) at a random scale, place and colour; uint8 HxWx3."""
    size = bg.shape[0]
    side = int(round(size * rng.uniform(*SCALE)))
    alpha = glyph(digit, side)[..., None]
    y, x = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
    under = bg[y:y + side, x:x + side]
    ink = alpha[..., 0] > 0.5
    bg_luma = float((under[ink] if ink.any() else under.reshape(-1, 3)).mean(axis=0) @ _LUMA)
    for _ in range(100):
        colour = rng.uniform(0, 255, size=3)
        if abs(colour @ _LUMA - bg_luma) >= MIN_CONTRAST:
            break
    else:  # a mid-grey background no random colour cleared: black or white, whichever is further
        colour = np.zeros(3) if bg_luma > 127.5 else np.full(3, 255.0)
    out = bg.copy()
    out[y:y + side, x:x + side] = (1 - alpha) * under + alpha * colour
    return np.round(out).clip(0, 255).astype(np.uint8)


def write_photodigits(root: str | Path, images: np.ndarray, labels: np.ndarray,
                      splits: tuple[np.ndarray, np.ndarray], size: int = SIZE, copies: int = COPIES,
                      seed: int = SEED) -> dict[str, int]:
    """root/{train,val}/<digit>/*.png from the 8x8 `images` (uint8) with their `labels`, the (train, val)
    indices `splits` (builtin:digits' split); returns the number of files per split."""
    from PIL import Image

    root = Path(root)
    counts = {}
    for split, indices in zip(("train", "val"), splits):
        pool = background_pool(split == "val", seed)
        rng = np.random.default_rng([seed, split == "val"])
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i in indices:
            for j in range(copies):
                img = composite(images[i], background(pool, rng, size), rng)
                Image.fromarray(img).save(root / split / str(labels[i]) / f"{i:04d}_{j}.png")
        counts[split] = len(indices) * copies
    return counts
