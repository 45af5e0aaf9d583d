"""Generated photo-like JPEGs as an ImageFolder, for loader and end-to-end benchmarks where no dataset exists.

Needs only numpy and Pillow (the GPU check machine has no scikit-learn, no scikit-image, no internet). Each
image is a smooth random colour field (a coarse random grid upsampled bicubically: large regions and edges,
like a photograph) plus fine grain, saved as JPEG quality 90 at ImageNet's average size (500x375, every
third one portrait). Files come out at ~65 KB (ImageNet's average is ~110 KB) and decode in about the time
of the bundled photographs of that size: real decode work, neither the trivial decode of a flat image nor the
worst case of pure noise. `unique` images are drawn; the remaining names are hard links to them (the loader
still opens and decodes every file; only the writing is saved).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

# Written last: a folder without it is an interrupted write and is rebuilt.
_COMPLETE = "COMPLETE"


def _photo_like(rng: np.random.Generator, size: tuple[int, int]):
    from PIL import Image

    w, h = size
    coarse = rng.integers(0, 256, size=(int(rng.integers(4, 12)), int(rng.integers(4, 12)), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0.0, 10.0, size=img.shape).astype(np.float32)  # grain: what makes JPEG files big
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_synthetic_folder(root: str | Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 10,
                           unique: int = 256, seed: int = 0, quality: int = 90) -> Path:
    """n JPEGs as root/c<k>/<i>.jpg (k = i mod classes), `unique` of them distinct; returns root.

    A folder already written with the same arguments is reused.
    """
    if n < 1:
        raise ValueError(f"n = {n}: need at least one image")
    root = Path(root)
    stamp = f"n={n} size={size[0]}x{size[1]} classes={classes} unique={unique} seed={seed} quality={quality}\n"
    done = root / _COMPLETE
    if done.is_file() and done.read_text() == stamp:
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    firsts: list[Path] = []
    for i in range(n):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        if i < unique:
            out = size if i % 3 else size[::-1]
            _photo_like(rng, out).save(path, quality=quality)
            firsts.append(path)
            continue
        src = firsts[i % len(firsts)]
        try:
            os.link(src, path)
        except OSError:  # a file system without hard links
            shutil.copyfile(src, path)
    done.write_text(stamp)
    return root
