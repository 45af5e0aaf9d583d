"""builtin:scenes: real photographs, one class each, train and val crops from disjoint tiles."""
import numpy as np
from PIL import Image

from fastft.pipelines import scenes
from fastft.pipelines.builtin import materialize


def test_tiles_cover_the_image_without_overlap_and_crops_stay_inside():
    cover = np.zeros((101, 77), np.int64)
    rng = np.random.default_rng(0)
    for tile in scenes.tiles((101, 77)):
        top, left, h, w = tile
        cover[top:top + h, left:left + w] += 1
        for y, x, side in scenes.crop_boxes(tile, 50, rng):
            assert top <= y and y + side <= top + h and left <= x and x + side <= left + w
            assert side >= min(h, w) // 2
    assert (cover == 1).all()
    train, val = scenes.split_tiles(np.random.default_rng(1))
    assert len(val) == scenes.VAL_TILES and not set(train) & set(val) and len(train) + len(val) == 16


def test_materialised_once_with_a_class_per_photograph(data_cache):
    root = materialize("builtin:scenes", data_cache)
    classes = sorted(p.name for p in (root / "train").iterdir())
    assert classes == sorted(scenes.SOURCES) and sorted(p.name for p in (root / "val").iterdir()) == classes
    per_train = (16 - scenes.VAL_TILES) * scenes.TRAIN_PER_TILE
    for name in classes:
        train, val = list((root / "train" / name).iterdir()), list((root / "val" / name).iterdir())
        assert len(train) == per_train and len(val) == scenes.VAL_TILES * scenes.VAL_PER_TILE
        # File names carry the tile: no tile gives crops to both splits.
        assert not {p.name[:3] for p in train} & {p.name[:3] for p in val}
    img = Image.open(next((root / "val" / "brick").iterdir()))
    assert img.size == (scenes.SIZE, scenes.SIZE) and img.mode == "RGB"
    assert materialize("builtin:scenes", data_cache) == root  # the second call reuses it
