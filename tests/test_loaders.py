"""DALI and FFCV loaders against the torchvision reference: interface, statistical parity, sharding, errors.

Parity is measured, not assumed: synthetic images whose pixels encode their own coordinates reveal each
view's crop (area fraction, aspect ratio) and flip; two-tone images under a full-image crop reveal the colour
jitter (brightness, contrast with its pivot, saturation, hue) and the grayscale rate; the bundled photographs
go through the whole MoCo v2 recipe and the JPEG decode paths. Distributions are compared with two-sample
Kolmogorov-Smirnov tests at alpha = 1e-4 on ~1000 views; each geometry test also checks that the same test
rejects torchvision with RandomResizedCrop scale (0.08, 1), so it could fail.
"""
from __future__ import annotations

import collections
import colorsys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from conftest import tiny_overrides
from fastft.config import load_config
from fastft.data import available_backends, pretrain_loader
from torchvision import transforms as TT

from fastft.pipelines.augment import (AUG_SPECS, CROP, FLIP, IMAGENET_MEAN, IMAGENET_STD, Step, TwoViews,
                                      _torchvision_step, blur_kernel_size, torchvision_train_transform)
from fastft.pipelines.imagefolder import SubsetImageFolder
from fastft.pipelines.photos import write_photo_folder
from fastft.pipelines.torchvision_loader import TorchvisionLoader

pytestmark = pytest.mark.skipif(set(available_backends()) != {"torchvision", "dali", "ffcv", "nvjpeg"},
                                reason="needs the dali and ffcv extras (make install installs them)")
CPU = torch.device("cpu")
ALPHA = 1e-4
# Loader variants checked against torchvision: each fast backend with each executor of the colour steps
# (loader.color_ops): the numba kernels (the CPU default) and batched tensor ops (the GPU default).
# nvjpeg-numba is that backend's CPU default (uint8 antialiased resize per view, numba colour); nvjpeg-torch runs
# its GPU path on the CPU (roi_align per image size, batched tensor colour ops).
VARIANTS = ["dali-numba", "dali-torch", "ffcv-numba", "ffcv-torch", "nvjpeg-numba", "nvjpeg-torch"]

JITTER = Step("color_jitter", p=1.0, params={"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1})
FULL = Step("random_resized_crop", params={"scale": (1.0, 1.0), "ratio": (1.0, 1.0)})  # the whole square image
TEST_SPECS = {
    "t_geom": (CROP, FLIP),
    "t_geom_wide": (Step("random_resized_crop", params={"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3)}), FLIP),
    "t_color": (FULL, JITTER),
    "t_color_wide_hue": (FULL, Step("color_jitter", p=1.0, params={**JITTER.params, "hue": 0.2})),
    "t_gray": (FULL, Step("grayscale", p=0.2)),
    "t_blur": (FULL, Step("gaussian_blur", p=1.0, params={"sigma": (0.1, 2.0)})),
    "t_blur_narrow": (FULL, Step("gaussian_blur", p=1.0, params={"sigma": (0.1, 1.4)})),
}


@pytest.fixture(scope="module", autouse=True)
def test_specs():
    AUG_SPECS.update(TEST_SPECS)
    yield
    for name in TEST_SPECS:
        AUG_SPECS.pop(name, None)


# ----------------------------------------------------------------------------------------------- data

def _coord_image(w: int, h: int) -> np.ndarray:
    """R = x, G = y, B = 128: a view's pixels tell where in the source they came from."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w)[None, :]
    img[..., 1] = np.arange(h)[:, None]
    img[..., 2] = 128
    return img


TONE_A, TONE_B = (200, 80, 40), (40, 90, 170)


def _two_tone(size: int = 64) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[:, : size // 2] = TONE_A
    img[:, size // 2:] = TONE_B
    return img


def _write_folder(root, images: list[np.ndarray], classes: int = 4):
    for i, img in enumerate(images):
        folder = root / f"k{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    """ImageFolder roots and their .beton files (raw pixels for the synthetic ones, JPEG for the photos)."""
    from fastft.pipelines.convert import convert

    base = tmp_path_factory.mktemp("loaders")
    roots = {
        "coords": _write_folder(base / "coords", [_coord_image(240, 180) if i % 2 else _coord_image(180, 240)
                                                  for i in range(400)]),
        "tones": _write_folder(base / "tones", [_two_tone()] * 200),
        "tones32": _write_folder(base / "tones32", [_two_tone(32)] * 200),  # views at 32: no resampling at all
        "photos": write_photo_folder(base / "photos", 48, size=(160, 120), classes=4),
    }
    out = {}
    for name, root in roots.items():
        beton = base / f"{name}.beton"
        convert(str(root), beton, write_mode="jpg" if name == "photos" else "raw", num_workers=1)
        out[name] = (root, beton)
    return out


def make_loader(variant: str, data: tuple, aug: str, size: int, batch: int, *, rank: int = 0, world: int = 1,
                seed: int = 0, crop_scale_min: float = 0.0):
    root, beton = data
    kind, _, color = variant.partition("-")  # backend-executor; the executor defaults to auto
    if kind == "torchvision":
        transform = torchvision_train_transform(aug, size, crop_scale_min) if color != "tensor" \
            else tensor_transform(aug, size)
        ds = SubsetImageFolder(root, transform=TwoViews(transform))
        return TorchvisionLoader(ds, batch, 0, CPU, train=True, seed=seed, rank=rank, world_size=world)
    if kind == "nvjpeg":
        from fastft.pipelines.nvjpeg_loader import NvJPEGLoader

        return NvJPEGLoader(SubsetImageFolder(root), batch, 2, CPU, train=True, aug=aug, image_size=size, seed=seed,
                            rank=rank, world_size=world, color_ops=color or "auto", crop_scale_min=crop_scale_min,
                            resize="roi_align" if color == "torch" else "interpolate")
    if kind == "dali":
        from fastft.pipelines.dali_loader import DALILoader

        return DALILoader(SubsetImageFolder(root), batch, 2, CPU, train=True, aug=aug, image_size=size, seed=seed,
                          rank=rank, world_size=world, color_ops=color or "auto", crop_scale_min=crop_scale_min)
    from fastft.pipelines.ffcv_loader import FFCVLoader

    return FFCVLoader(beton, batch, 2, CPU, train=True, aug=aug, image_size=size, seed=seed, rank=rank,
                      world_size=world, color_ops=color or "auto", crop_scale_min=crop_scale_min)


def tensor_transform(aug: str, size: int) -> TT.Compose:
    """The same torchvision transforms on float tensors instead of PIL images.

    PIL's hue shift goes through uint8 HSV (hue in 1/255 turns, the shift truncated towards zero), which
    moves the hue of a colour by up to ~0.006 turn against the float formula; torchvision's tensor path and
    every backend here use the float formula. On 800 views that alone separates PIL from torchvision's own
    tensor path (KS p ~ 0.002 on a hue statistic), so the colour tests compare with the tensor path.
    """
    steps = [_torchvision_step(s, size) for s in AUG_SPECS[aug]]
    return TT.Compose([TT.PILToTensor(), TT.ConvertImageDtype(torch.float32), *steps,
                       TT.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def pixels(v: torch.Tensor) -> np.ndarray:
    """Normalised NCHW views -> NHWC in 0..255, rounded to the uint8 levels they came from.

    Rounding matters: undoing the normalisation leaves float noise of ~1e-5, so the channels of a grey view
    differ by that much in one backend and not at all in another, and a KS test then "sees" 20% of views
    move off exactly zero chroma.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((v * std + mean) * 255).round().permute(0, 2, 3, 1).numpy()


def collect(loader, n: int) -> np.ndarray:
    """At least n views (both views of each image), over as many epochs as it takes."""
    assert len(loader) > 0, "an epoch of this loader is empty"
    out, epoch = [], 0
    while sum(len(x) for x in out) < n:
        loader.set_epoch(epoch)
        for v1, v2, _ in loader:
            out += [pixels(v1), pixels(v2)]
        epoch += 1
    return np.concatenate(out)[:n]


_CACHE: dict = {}


def views(variant: str, data_name: str, aug: str, size: int, n: int, datasets) -> np.ndarray:
    """Views of one loader variant, memoised across tests (FFCV compiles for a while per loader)."""
    key = (variant, data_name, aug, size, n)
    if key not in _CACHE:
        if variant.startswith("torchvision"):
            torch.manual_seed(0)
        _CACHE[key] = collect(make_loader(variant, datasets[data_name], aug, size, 16), n)
    return _CACHE[key]


def ks(a: np.ndarray, b: np.ndarray) -> float:
    return stats.ks_2samp(a, b).pvalue


# ----------------------------------------------------------------------------------------------- statistics

def crop_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """Area fraction, aspect ratio and flip of each view of a coordinate image (source 240x180 or 180x240).

    The slope of R along a row (G down a column) is the crop's width (height) per output pixel; the interior
    columns are used because a linear ramp survives any symmetric interpolation there.
    """
    s = x.shape[1]
    dx = (x[:, :, s - 2, 0] - x[:, :, 1, 0]).mean(axis=1) / (s - 3)
    dy = (x[:, s - 2, :, 1] - x[:, 1, :, 1]).mean(axis=1) / (s - 3)
    w, h = np.abs(dx) * s, np.abs(dy) * s
    # Where the crop sits: its centre, relative to the room the crop had to move in (0..1 when it fits).
    big = (x[:, :, :, 1].max(axis=(1, 2)) > 180)  # portrait sources (180 wide, 240 high) reach G > 180
    width, height = np.where(big, 180, 240), np.where(big, 240, 180)
    cx = (x[:, :, :, 0].mean(axis=(1, 2)) + 0.5 - w / 2) / np.maximum(width - w, 1)
    cy = (x[:, :, :, 1].mean(axis=(1, 2)) + 0.5 - h / 2) / np.maximum(height - h, 1)
    return {"area": w * h / (240 * 180), "aspect": w / h, "flip": dx < 0, "x": cx, "y": cy}


def _hsv(rgb: np.ndarray) -> np.ndarray:
    return np.array([colorsys.rgb_to_hsv(*(np.clip(c, 0, 255) / 255)) for c in rgb])


def tone_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per view of a two-tone image: mean luma (brightness), luma difference of the tones (contrast; also
    shows the pivot), HSV saturation of each tone (saturation), hue of each tone (hue), grey or not."""
    s = x.shape[1]
    a = x[:, 2:-2, 2: s // 2 - 3].reshape(len(x), -1, 3).mean(axis=1)
    b = x[:, 2:-2, s // 2 + 3: -2].reshape(len(x), -1, 3).mean(axis=1)
    luma = np.array([0.299, 0.587, 0.114])
    ha, hb = _hsv(a), _hsv(b)
    return {"brightness": (a @ luma + b @ luma) / 2, "contrast": b @ luma - a @ luma, "saturation_a": ha[:, 1],
            "saturation_b": hb[:, 1], "hue_a": ha[:, 0], "hue_b": (hb[:, 0] + 0.5) % 1.0,
            "grey": (np.ptp(a, axis=1) < 2) & (np.ptp(b, axis=1) < 2)}


def edge_width(x: np.ndarray) -> np.ndarray:
    """Per view of a two-tone image: the spread (std, in pixels) of the luma step across its vertical edge;
    about 0.3 unblurred, about sigma after a Gaussian blur."""
    s = x.shape[1]
    profile = (x[:, 2:-2, :, :] @ np.array([0.299, 0.587, 0.114])).mean(axis=1)  # [N, W]
    d = np.abs(np.diff(profile, axis=1))
    pos = np.arange(s - 1)[None, :]
    centre = (d * pos).sum(1) / d.sum(1)
    return np.sqrt((d * (pos - centre[:, None]) ** 2).sum(1) / d.sum(1))


def photo_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """Brightness, contrast and colourfulness of each view, on 4x4-pooled pixels: resampling filters differ
    between backends (PIL's antialiased bilinear, DALI's, OpenCV's INTER_AREA in FFCV), and per-pixel detail
    statistics would measure the filters rather than the augmentation."""
    n, s = len(x), x.shape[1] // 4
    pooled = x[:, : 4 * s, : 4 * s].reshape(n, s, 4, s, 4, 3).mean(axis=(2, 4))
    luma = pooled @ np.array([0.299, 0.587, 0.114])
    return {"mean_luma": luma.mean(axis=(1, 2)), "std_luma": luma.std(axis=(1, 2)),
            "chroma": np.ptp(pooled, axis=3).mean(axis=(1, 2))}


# ----------------------------------------------------------------------------------------------- interface

@pytest.mark.parametrize("variant", VARIANTS)
def test_batches_have_the_reference_format(variant, datasets):
    ref = make_loader("torchvision", datasets["photos"], "mocov2", 32, 8)
    loader = make_loader(variant, datasets["photos"], "mocov2", 32, 8)
    assert len(loader) == len(ref) == 48 // 8
    (r1, _, rl), (v1, v2, labels) = next(iter(ref)), next(iter(loader))
    for v in (v1, v2):
        assert v.shape == r1.shape == (8, 3, 32, 32) and v.dtype == r1.dtype == torch.float32
        assert v.is_contiguous(memory_format=torch.channels_last) and v.device == CPU
        p = pixels(v)
        assert p.min() > -0.5 and p.max() < 255.5  # ImageNet-normalised 0..255 content
    assert labels.dtype == rl.dtype == torch.int64 and labels.shape == (8,)
    assert set(labels.tolist()) <= set(range(4))
    assert not torch.equal(v1, v2)


# ----------------------------------------------------------------------------------------------- parity

@pytest.fixture(scope="module")
def reference_geometry(datasets):
    good = crop_stats(views("torchvision", "coords", "t_geom", 32, 1200, datasets))
    wide = crop_stats(views("torchvision", "coords", "t_geom_wide", 32, 1200, datasets))
    # The test has power: torchvision with scale (0.08, 1) is rejected against torchvision with (0.2, 1).
    assert ks(good["area"], wide["area"]) < 1e-6
    return good, wide


@pytest.mark.parametrize("variant", VARIANTS[::2] + ["nvjpeg-torch"])  # colour does not move the crop; resize can
def test_crop_area_aspect_and_flip_match_torchvision(variant, datasets, reference_geometry):
    ref, wide = reference_geometry
    got = crop_stats(views(variant, "coords", "t_geom", 32, 1200, datasets))
    assert ks(got["area"], ref["area"]) > ALPHA, "crop area fraction distribution differs"
    assert ks(got["aspect"], ref["aspect"]) > ALPHA, "crop aspect ratio distribution differs"
    assert ks(got["x"], ref["x"]) > ALPHA and ks(got["y"], ref["y"]) > ALPHA, "crop position distribution differs"
    assert ks(got["area"], wide["area"]) < 1e-6, "cannot tell scale (0.2, 1) from (0.08, 1)"
    assert 0.19 < got["area"].min() and got["area"].max() <= 1.02
    assert stats.binomtest(int(got["flip"].sum()), len(got["flip"]), 0.5).pvalue > ALPHA


@pytest.mark.parametrize("variant", ["torchvision", "dali-numba", "ffcv-numba", "nvjpeg-numba"])
def test_crop_scale_min_reaches_every_backend(variant, datasets):
    """loader.crop_scale_min (here 0.6) replaces the recipe's 0.2 in every backend's crop."""
    got = crop_stats(collect(make_loader(variant, datasets["coords"], "t_geom", 32, 16, crop_scale_min=0.6), 300))
    assert 0.57 < got["area"].min() and got["area"].max() <= 1.02
    assert (got["area"] < 0.8).any()  # still random: the small end of (0.6, 1) is drawn


@pytest.fixture(scope="module")
def reference_colour(datasets):
    ref = tone_stats(views("torchvision-tensor", "tones", "t_color", 32, 800, datasets))
    wide = tone_stats(views("torchvision-tensor", "tones", "t_color_wide_hue", 32, 800, datasets))
    assert ks(ref["hue_b"], wide["hue_b"]) < 1e-6  # the test has power: a hue range of 0.2 is rejected
    return ref


@pytest.mark.parametrize("variant", VARIANTS)
def test_color_jitter_ranges_match_torchvision(variant, datasets, reference_colour):
    ref = reference_colour
    got = tone_stats(views(variant, "tones", "t_color", 32, 800, datasets))
    bad = {k: ks(got[k], ref[k]) for k in ref if k != "grey" and ks(got[k], ref[k]) <= ALPHA}
    assert not bad, f"distributions differ from torchvision's (KS p-values): {bad}"
    # The hue range itself: shifts of the source hue spread over +-0.1 turn (95% of |shift| below 0.095 for a
    # uniform draw; clipping by the other ops moves a few a little further, in the reference too).
    hue_a = colorsys.rgb_to_hsv(*(np.array(TONE_A) / 255))[0]
    spread = [np.percentile(np.abs((h - hue_a + 0.5) % 1.0 - 0.5), 95) for h in (got["hue_a"], ref["hue_a"])]
    assert 0.085 < spread[0] < 0.105 and abs(spread[0] - spread[1]) < 0.01, spread


@pytest.mark.parametrize("variant", VARIANTS)
def test_grayscale_rate_matches_torchvision(variant, datasets):
    grey = tone_stats(views(variant, "tones", "t_gray", 32, 800, datasets))["grey"]
    assert stats.binomtest(int(grey.sum()), len(grey), 0.2).pvalue > ALPHA, f"grey rate {grey.mean():.3f}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_blur_matches_mocos_pil_blur(variant, datasets):
    """The blur of every executor against MoCo's (PIL, radius = sigma ~ U(0.1, 2)), by the edge it leaves."""
    ref = edge_width(views("torchvision", "tones32", "t_blur", 32, 600, datasets))
    narrow = edge_width(views("torchvision", "tones32", "t_blur_narrow", 32, 600, datasets))
    assert ks(ref, narrow) < 1e-6  # the test has power: sigma up to 1.4 instead of 2 is rejected
    got = edge_width(views(variant, "tones32", "t_blur", 32, 600, datasets))
    assert ks(got, ref) > ALPHA, f"edge spread: {np.percentile(got, [10, 50, 90])} vs {np.percentile(ref, [10, 50, 90])}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_mocov2_recipe_on_photos_matches_torchvision(variant, datasets):
    ref = photo_stats(views("torchvision", "photos", "mocov2", 48, 480, datasets))
    got = photo_stats(views(variant, "photos", "mocov2", 48, 480, datasets))
    bad = {k: ks(got[k], ref[k]) for k in ref if ks(got[k], ref[k]) <= ALPHA}
    assert not bad, f"photo statistics differ from torchvision's (KS p-values): {bad}"


# ----------------------------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv-torch", "nvjpeg"])  # ffcv-torch: compiles faster
def test_two_ranks_see_every_sample_once_with_equal_batch_counts(backend, tmp_path):
    from fastft.pipelines.convert import convert

    n = 39  # odd: one sample of padding; every image its own class, so labels identify samples
    root = tmp_path / "one_per_class"
    for i in range(n):
        (root / f"s{i:02d}").mkdir(parents=True)
        Image.fromarray(np.full((12, 10, 3), i * 6, np.uint8)).save(root / f"s{i:02d}" / "x.png")
    beton = tmp_path / "d.beton"
    convert(str(root), beton, num_workers=1)
    for batch, batches in ((5, 4), (6, 3)):  # 20 per rank: all of them, or 18 with the last batch dropped
        seen, counts = [], []
        for rank in range(2):
            loader = make_loader(backend, (root, beton), "mocov2", 8, batch, rank=rank, world=2, seed=3)
            loader.set_epoch(1)
            labels = [y for _, _, y in loader]
            assert len(loader) == len(labels) == batches
            counts.append(len(labels))
            seen += torch.cat(labels).tolist()
        assert counts[0] == counts[1]
        c = collections.Counter(seen)
        if batch == 5:
            assert sorted(c) == list(range(n)) and sum(c.values()) == 40 and max(c.values()) <= 2
            assert sum(v - 1 for v in c.values()) == 1  # the padding
        else:
            assert len(seen) == 36 and max(c.values()) <= 2


@pytest.mark.parametrize("variant", ["dali-numba", "dali-torch", "nvjpeg-numba", "nvjpeg-torch"])
def test_dali_and_nvjpeg_epochs_depend_only_on_seed_and_epoch(variant, tmp_path):
    """A resumed run replays an epoch: crops and colour draws of both executors are seeded by (seed, epoch)."""
    root = write_photo_folder(tmp_path / "p", 24, size=(64, 48), classes=2)
    first = []
    for epochs in ((0, 1), (1,)):
        loader = make_loader(variant, (root, None), "mocov2", 16, 4, seed=7)
        for epoch in epochs:
            loader.set_epoch(epoch)
            batch = next(iter(loader))
        first.append(batch)
    for a, b in zip(*first):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- errors

def test_dali_names_an_undecodable_file_instead_of_hanging(tmp_path, datasets):
    root = write_photo_folder(tmp_path / "p", 12, size=(64, 48), classes=2)
    bad = root / "c1" / "00003.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])  # truncated mid-scan
    loader = make_loader("dali-numba", (root, None), "mocov2", 16, 4)
    start = time.time()
    with pytest.raises(RuntimeError, match="00003.jpg.*truncated"):
        for _ in loader:
            pass
    assert time.time() - start < 60


def test_ffcv_names_the_source_of_a_damaged_sample(tmp_path, datasets):
    from fastft.pipelines.convert import convert
    from fastft.pipelines.ffcv_loader import BetonInfo, image_offset

    root = write_photo_folder(tmp_path / "p", 12, size=(64, 48), classes=2)
    beton = tmp_path / "p.beton"
    convert(str(root), beton, write_mode="jpg", num_workers=1)
    victim = 5
    with open(beton, "r+b") as f:  # wipe the JPEG header of one stored image
        f.seek(image_offset(beton, victim))
        f.write(b"\0" * 64)
    source = BetonInfo(beton).source(victim)
    loader = make_loader("ffcv-numba", (root, beton), "mocov2", 16, 4)
    with pytest.raises(RuntimeError, match=f"cannot decode image {source}"):
        for _ in loader:
            pass


# ----------------------------------------------------------------------------------------------- config

def test_config_dispatches_and_converts_builtin_data_for_ffcv(tmp_path, data_cache):
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache, **{"loader.backend": "ffcv",
                                                                     "data.image_size": 16, "loader.workers": 1}))
    loader = pretrain_loader(cfg, CPU)
    assert type(loader).__name__ == "FFCVLoader" and len(loader) == 1437 // 16
    assert loader.dataset.classes == [str(i) for i in range(10)]
    v1, v2, y = next(iter(loader))
    assert v1.shape == (16, 3, 16, 16) and y.shape == (16,)
    assert loader.executor == "numba"  # loader.color_ops: auto, on the CPU
    for backend, name in (("ffcv", "FFCVLoader"), ("dali", "DALILoader")):  # color_ops reaches both unchanged
        for color_ops in ("auto", "numba", "torch"):
            cfg = load_config(None, tiny_overrides(tmp_path, data_cache, **{
                "loader.backend": backend, "data.image_size": 16, "loader.color_ops": color_ops}))
            loader = pretrain_loader(cfg, CPU)
            assert type(loader).__name__ == name
            assert loader.executor == ("numba" if color_ops == "auto" else color_ops)


def test_ffcv_without_beton_dir_says_how_to_make_one(tmp_path, data_cache):
    (tmp_path / "data" / "train").mkdir(parents=True)
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache, **{"loader.backend": "ffcv",
                                                                     "data.path": str(tmp_path / "data")}))
    with pytest.raises(FileNotFoundError, match="loader.beton_dir is not set.*fastft-convert-dataset"):
        pretrain_loader(cfg, CPU)
    cfg = load_config(None, tiny_overrides(tmp_path, data_cache, **{
        "loader.backend": "ffcv", "data.path": str(tmp_path / "data"), "loader.beton_dir": str(tmp_path)}))
    with pytest.raises(FileNotFoundError, match=r"^loader.beton_dir .*: no .*train.beton; write it with "
                                                r"`fastft-convert-dataset"):
        pretrain_loader(cfg, CPU)


def test_numba_normalisation_equals_the_torch_one():
    """The CPU fast path of the loader interface (color_numba.normalize) against batch_augment's torch ops."""
    from fastft.pipelines import batch_augment, color_numba
    u8 = torch.randint(0, 256, (5, 7, 9, 3), dtype=torch.uint8)
    for channels_last in (True, False):
        got = color_numba.normalize(u8, channels_last)
        want = batch_augment.normalize_uint8_nhwc(u8, channels_last)
        assert got.shape == want.shape == (5, 3, 7, 9) and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last) == channels_last or not channels_last
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.6, 1.0, 1.5, 2.0])
def test_both_executors_blur_as_pil_does(sigma):
    """A one-pixel line through PIL's GaussianBlur(radius=sigma), the torch executor's and the numba kernel's
    blur: the same profile to the level (a true Gaussian misses PIL's by up to 20 levels at sigma 0.3; test_blur.py
    compares whole images)."""
    from PIL import ImageFilter
    from fastft.pipelines import batch_augment, color_numba
    img = np.zeros((41, 41, 3), np.uint8)
    img[:, 20] = 255
    pil = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma)), dtype=float)[20, :, 0]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    torch_row = batch_augment.gaussian_blur(x, torch.tensor([sigma]))[0, 0, 20].numpy() * 255
    AUG_SPECS["t_blur_one"] = (FULL, Step("gaussian_blur", p=1.0, params={"sigma": (sigma, sigma)}))
    try:
        numba_row = color_numba.augment_views_np(img[None], "t_blur_one", 41, np.random.default_rng(0))[0, 20, :, 0]
    finally:
        AUG_SPECS.pop("t_blur_one")
    assert np.abs(torch_row - pil).max() < 1e-3, (torch_row.round(1), pil)
    assert np.array_equal(numba_row, pil), (numba_row, pil)


@pytest.mark.parametrize("case", ["brightness", "jitter", "grayscale", "blur 0.7", "blur 1.9", "flip", "all"])
def test_numba_kernel_equals_the_torch_executor_on_given_draws(case):
    """color_numba's per-view kernel against batch_augment's torch ops, the same draws, on a random non-square
    image (so that both blur passes, their reflect borders and the flip are seen): equal up to the final
    rounding to uint8."""
    from fastft.pipelines import batch_augment as ba
    from fastft.pipelines import color_numba as cn
    h, w = 17, 29
    img = np.random.default_rng(3).integers(0, 256, (h, w, 3), dtype=np.uint8)
    prm = np.zeros(cn.PARAMS, np.float32)
    prm[cn.P_B:cn.P_H + 1] = [1.3, 1.0, 1.0, 0.0] if case == "brightness" else [1.2, 0.7, 1.4, 0.08]
    order = [3, 1, 0, 2]
    prm[cn.P_ORDER:cn.P_ORDER + 4] = order
    prm[cn.P_SIGMA] = 1.9 if case == "blur 1.9" else 0.7
    on = {"brightness": [cn.P_JITTER], "jitter": [cn.P_JITTER], "grayscale": [cn.P_GRAY], "blur 0.7": [cn.P_BLUR],
          "blur 1.9": [cn.P_BLUR], "flip": [cn.P_FLIP], "all": [cn.P_JITTER, cn.P_GRAY, cn.P_BLUR, cn.P_FLIP]}[case]
    prm[on] = 1.0
    size = blur_kernel_size(h)
    got = np.empty_like(img)
    cn.kernels()[1](img, got, prm, cn.program("mocov2"), size)

    x = torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255  # the torch ops in mocov2's order
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    if prm[cn.P_JITTER]:
        ops = (ba.adjust_brightness, ba.adjust_contrast, ba.adjust_saturation, ba.adjust_hue)
        for k in order:
            x = ops[k](x, one(prm[cn.P_B + k]))
    if prm[cn.P_GRAY]:
        x = ba.rgb_to_grayscale(x)
    if prm[cn.P_BLUR]:
        x = ba.gaussian_blur(x.float(), one(prm[cn.P_SIGMA])).double()
    if prm[cn.P_FLIP]:
        x = x.flip(-1)
    want = (x[0].permute(1, 2, 0) * 255).clamp(0, 255).round().numpy()
    assert not np.array_equal(got, img)  # the case changed the image
    assert np.abs(got.astype(float) - want).max() <= 1.0
