"""Real photographs bundled with scikit-image and scikit-learn, written as an ImageFolder of JPEGs.

For decode and augmentation tests on real JPEG content and for loader benchmarks at ImageNet size (the
average ImageNet train image is about 500x375): each file is a random crop (at least 60% of each side) of one
of the bundled photographs, resized to `size` (portrait for every third file), randomly mirrored and saved
at JPEG quality 90. Nothing is downloaded: the photographs ship inside the packages.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

# scikit-image photographs that ship in its wheel (others need pooch and a download).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
                  "rocket")


def bundled_photos() -> list[np.ndarray]:
    """uint8 HxWx3 RGB photographs: scikit-image's colour ones and scikit-learn's two samples."""
    from sklearn.datasets import load_sample_images

    photos = [img for img in load_sample_images().images]
    try:
        import skimage.data as data
    except ImportError:  # scikit-image is a dev dependency; scikit-learn's two photos still work
        return photos
    photos += [getattr(data, name)() for name in SKIMAGE_PHOTOS]
    photos.append(data.stereo_motorcycle()[0])
    return [np.ascontiguousarray(p[..., :3]) for p in photos]


def write_photo_folder(root: str | Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 10,
                       seed: int = 0, quality: int = 90) -> Path:
    """n JPEGs under root/c<k>/ (k = i mod classes), each size = (width, height) or its transpose."""
    from PIL import Image

    root = Path(root)
    photos = bundled_photos()
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)])
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = size if i % 3 else size[::-1]
        img = img.crop((x, y, x + cw, y + ch)).resize(out, Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=quality)
    return root
