"""builtin:photodigits: digits on patches of photographs, labelled by the digit; train and val from disjoint
digits and disjoint parts of the photographs."""
import numpy as np
from PIL import Image

from fastft.pipelines import photodigits, scenes
from fastft.pipelines.builtin import digits_arrays, digits_split, materialize

LUMA = np.array([0.299, 0.587, 0.114])


def test_materialised_once_with_disjoint_digits_in_train_and_val(data_cache):
    root = materialize("builtin:photodigits", data_cache)
    _, labels = digits_arrays()
    train_idx, val_idx = digits_split(labels)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        assert sorted(p.name for p in (root / split).iterdir()) == [str(c) for c in range(10)]
        files = list((root / split).glob("*/*.png"))
        assert len(files) == len(idx) * photodigits.COPIES
        # File names carry the digit's index in scikit-learn's set, and the folder its label.
        assert {int(p.name[:4]) for p in files} == set(idx.tolist())
        assert all(labels[int(p.name[:4])] == int(p.parent.name) for p in files)
    img = Image.open(next((root / "val" / "3").iterdir()))
    assert img.size == (photodigits.SIZE, photodigits.SIZE) and img.mode == "RGB"
    assert materialize("builtin:photodigits", data_cache) == root  # the second call reuses it


def test_train_and_val_backgrounds_share_no_pixel_and_match_the_scenes_split():
    train, val = photodigits.background_pool(False), photodigits.background_pool(True)
    assert {k for k, _, _ in train} == {k for k, _, _ in val} == set(range(len(scenes.SOURCES)))
    for k in range(len(scenes.SOURCES)):
        shape = next(p.shape[:2] for j, p, _ in train if j == k)
        cover = np.zeros(shape, np.int64)
        for j, _, (top, left, h, w) in train + val:
            if j == k:
                cover[top:top + h, left:left + w] += 1
        assert cover.max() == 1  # no pixel in a train tile and a val tile
        grid = scenes.tiles(shape)
        assert sorted(grid.index(t) for j, _, t in val if j == k) == scenes.split_tiles(np.random.default_rng([0, k]))[1]


def test_each_digit_is_visible_and_placed_scaled_and_coloured_at_random():
    images, _ = digits_arrays()
    rng = np.random.default_rng(0)
    sides, places, colours = set(), set(), []
    for i in range(60):
        # A flat background of random colour: where the ink is solid, out - bg is the colour's contrast itself.
        bg = np.broadcast_to(rng.uniform(0, 255, size=3), (32, 32, 3)).copy()
        out = photodigits.composite(images[i], bg, rng).astype(np.float64)
        diff = (out - bg) @ LUMA
        assert np.abs(diff).max() >= 0.85 * photodigits.MIN_CONTRAST, i  # the ink peaks near alpha 1
        ys, xs = np.nonzero(np.abs(out - bg).max(axis=2) > 1)
        sides.add(max(ys.max() - ys.min(), xs.max() - xs.min()))
        places.add((ys.min() // 4, xs.min() // 4))
        colours.append(out[np.abs(diff) >= 0.95 * np.abs(diff).max()].mean(axis=0))
    lo, hi = (round(32 * s) for s in photodigits.SCALE)
    assert min(sides) < lo + 6 and max(sides) > hi - 6  # scales over the whole range
    assert len(places) > 10  # top-left corners in 4-pixel cells: up to 25 (the glyph stays inside)
    assert np.std(colours, axis=0).min() > 30  # colours vary in every channel
