"""`builtin:scenes`: crops of real photographs labelled by the photograph they come from.

The sources are the photographs that ship inside installed packages (scikit-image's `skimage/data`, scikit-learn's
two sample images, matplotlib's sample data): colour scenes (astronaut, cat, coffee, rocket, ...) and grey
textures (brick, grass, gravel, ...), one class each. Telling them apart from a small crop needs what contrastive
learning is for: invariance to where the crop sits, how large it is and which way it faces. Raw pixels match
crops of the same place, not of the same scene.

Each photograph is cut into a 4 x 4 grid of tiles; 4 tiles (drawn with a fixed seed) give the val crops and the
other 12 the train crops, and every crop lies inside one tile: **train and val share no pixel**. A crop's side
is 50-100% of its tile's shorter side, at a random position in the tile, randomly mirrored, resized (antialiased)
to SIZE x SIZE and written as PNG. Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

SIZE = 32
GRID = 4
VAL_TILES = 4
TRAIN_PER_TILE = 16
VAL_PER_TILE = 12
SEED = 0


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data as data

        return getattr(data, name)()
    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]
    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook
        from PIL import Image

        with cbook.get_sample_data(name) as f:
            return np.asarray(Image.open(f).convert("RGB"))
    return load


# class name -> loader of the photograph (uint8 HxW or HxWx3/4). Order is the class order.
SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"), "brick": _skimage("brick"), "camera": _skimage("camera"),
    "cat": _skimage("chelsea"), "china": _sklearn(0), "coffee": _skimage("coffee"), "coins": _skimage("coins"),
    "flower": _sklearn(1), "grace_hopper": _matplotlib("grace_hopper.jpg"), "grass": _skimage("grass"),
    "gravel": _skimage("gravel"), "hubble": _skimage("hubble_deep_field"), "ihc": _skimage("immunohistochemistry"),
    "moon": _skimage("moon"), "motorcycle": lambda: _skimage("stereo_motorcycle")()[0], "retina": _skimage("retina"),
    "rocket": _skimage("rocket"),
}


def rgb(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def tiles(shape: tuple[int, int], grid: int = GRID) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of the grid's tiles, row by row; they cover the image and never overlap."""
    h, w = shape
    ys, xs = np.linspace(0, h, grid + 1).astype(int), np.linspace(0, w, grid + 1).astype(int)
    return [(ys[r], xs[c], ys[r + 1] - ys[r], xs[c + 1] - xs[c]) for r in range(grid) for c in range(grid)]


def crop_boxes(tile: tuple[int, int, int, int], n: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """n (top, left, side) squares inside `tile`, sides 50-100% of its shorter side."""
    top, left, th, tw = tile
    out = []
    for _ in range(n):
        side = max(1, int(round(min(th, tw) * rng.uniform(0.5, 1.0))))
        out.append((top + int(rng.integers(0, th - side + 1)), left + int(rng.integers(0, tw - side + 1)), side))
    return out


def split_tiles(rng: np.random.Generator, grid: int = GRID, val: int = VAL_TILES) -> tuple[list[int], list[int]]:
    order = rng.permutation(grid * grid)
    return sorted(order[val:].tolist()), sorted(order[:val].tolist())


def write_scenes(root: str | Path, size: int = SIZE, seed: int = SEED) -> dict[str, int]:
    """root/train/<class>/*.png and root/val/<class>/*.png; returns the number of files per split."""
    from PIL import Image

    root = Path(root)
    counts = {"train": 0, "val": 0}
    for k, (name, load) in enumerate(SOURCES.items()):
        photo = rgb(load())
        rng = np.random.default_rng([seed, k])
        grid = tiles(photo.shape[:2])
        train, val = split_tiles(rng)
        for split, chosen, per in (("train", train, TRAIN_PER_TILE), ("val", val, VAL_PER_TILE)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for t in chosen:
                for i, (y, x, side) in enumerate(crop_boxes(grid[t], per, rng)):
                    img = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR,
                                                                                 reducing_gap=None)
                    if rng.random() < 0.5:
                        img = img.transpose(Image.FLIP_LEFT_RIGHT)
                    img.save(folder / f"t{t:02d}_{i:02d}.png")
                    counts[split] += 1
    return counts
