"""Built-in real datasets, materialised once as ImageFolder trees so every backend reads real files.

`builtin:digits`: scikit-learn's bundled handwritten digits (1,797 real 8x8 grey images, 10 classes), split
80/20 stratified with a fixed seed into train/ and val/.
`builtin:scenes`: 32x32 crops of 17 photographs bundled with scikit-image, scikit-learn and matplotlib, labelled
by photograph, train and val cut from disjoint tiles of each (scenes.py): 3,264 train and 816 val images.
`builtin:photodigits`: those digits composited at random place, scale and colour onto patches of the same
photographs, labelled by the digit; train and val from disjoint digits and disjoint tiles (photodigits.py):
4,311 train and 1,080 val images.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

# name -> version; bump a version when that dataset's files change, so old caches are not reused
BUILTINS = {"digits": "v1", "scenes": "v1", "photodigits": "v1"}


def is_builtin(path: str) -> bool:
    return path.startswith("builtin:")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 [N, 8, 8] (0..16 scaled to 0..255) and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def digits_split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=val_fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def _write_digits(root: Path) -> None:
    from PIL import Image

    images, labels = digits_arrays()
    train, val = digits_split(labels)
    for split, indices in (("train", train), ("val", val)):
        for i in indices:
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    (root / "COMPLETE").write_text(f"{BUILTINS['digits']} train={len(train)} val={len(val)}\n")


def _write_scenes(root: Path) -> None:
    from .scenes import write_scenes

    counts = write_scenes(root)
    (root / "COMPLETE").write_text(f"{BUILTINS['scenes']} train={counts['train']} val={counts['val']}\n")


def _write_photodigits(root: Path) -> None:
    from .photodigits import write_photodigits

    images, labels = digits_arrays()
    counts = write_photodigits(root, images, labels, digits_split(labels))
    (root / "COMPLETE").write_text(f"{BUILTINS['photodigits']} train={counts['train']} val={counts['val']}\n")


_WRITERS = {"digits": _write_digits, "scenes": _write_scenes, "photodigits": _write_photodigits}


def materialize(path: str, cache_dir: str | Path) -> Path:
    """The ImageFolder root of built-in dataset `path` ("builtin:NAME"), writing it on first use.

    Written into a temporary folder and renamed into place, so an interrupted write never leaves a
    half-written dataset that later runs would trust.
    """
    name = path.split(":", 1)[1]
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in dataset {path!r}; valid: {', '.join('builtin:' + b for b in BUILTINS)}")
    cache = Path(cache_dir).expanduser()
    root = cache / f"{name}-{BUILTINS[name]}"
    if (root / "COMPLETE").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        _WRITERS[name](tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first, or a stale incomplete folder is in the way
            if not (root / "COMPLETE").is_file():
                shutil.rmtree(root, ignore_errors=True)
                os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
