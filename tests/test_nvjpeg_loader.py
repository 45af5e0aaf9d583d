"""The nvjpeg backend's own pieces (its statistical parity with torchvision is in test_loaders.py)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as TT

from fastft.pipelines import nvjpeg_loader as nv
from fastft.pipelines.crops import crop_boxes
from fastft.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, torchvision_eval_transform
from fastft.pipelines.imagefolder import SubsetImageFolder
from fastft.pipelines.photos import write_photo_folder

CPU = torch.device("cpu")


def test_crop_boxes_follow_random_resized_crop():
    """Against torchvision's get_params on the same image sizes: area share, aspect, fits inside, fallback."""
    gen = torch.Generator().manual_seed(0)
    hw = torch.tensor([[375, 500], [500, 375], [64, 64], [20, 300]] * 500)
    boxes = crop_boxes(hw, (0.2, 1.0), (3 / 4, 4 / 3), gen)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= hw[:, 1]).all() and (boxes[:, 3] <= hw[:, 0]).all()
    regular = hw[:, 0] != 20
    share = (w * h / (hw[:, 0] * hw[:, 1]))[regular]
    assert 0.18 < share.min() and share.max() <= 1.0
    aspect = (w / h)[regular]
    assert aspect.min() > 0.70 and aspect.max() < 1.43  # 3/4..4/3, widened by rounding to whole pixels
    torch.manual_seed(0)
    ref = np.array([TT.RandomResizedCrop.get_params(torch.empty(3, 375, 500), [0.2, 1.0], [3 / 4, 4 / 3])
                    for _ in range(500)])
    ours = share[: 500 * 3: 3].numpy()  # the 375x500 rows
    from scipy import stats
    assert stats.ks_2samp(ours, ref[:, 2] * ref[:, 3] / (375 * 500)).pvalue > 1e-4
    # 20x300 never fits a 3/4..4/3 crop of >= 20% area: torchvision's fallback, the central crop at ratio 4/3.
    thin = boxes[~regular]
    assert torch.equal(thin[:, 3] - thin[:, 1], torch.full((len(thin),), 20.0))
    assert torch.equal(thin[:, 2] - thin[:, 0], torch.full((len(thin),), 27.0))


@pytest.mark.parametrize("method", ["interpolate", "roi_align"])
def test_eval_views_equal_torchvision_resize_and_center_crop(tmp_path, method):
    root = write_photo_folder(tmp_path / "p", 6, size=(120, 90), classes=2)
    ds = SubsetImageFolder(root)
    loader = nv.NvJPEGLoader(ds, 6, 0, CPU, train=False, image_size=32, eval_crop_ratio=0.875)
    loader.resize = method
    images, labels = next(iter(loader))
    ref = torch.stack([torchvision_eval_transform(32, 0.875)(Image.open(p).convert("RGB")) for p, _ in ds.samples])
    assert images.shape == ref.shape and labels.tolist() == [y for _, y in ds.samples]
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    err = ((images - ref) * std * 255).abs()  # in 0..255 levels; decoders and resampling filters differ slightly
    assert err.mean() < 3.0 and err.max() < 60, (float(err.mean()), float(err.max()))
    shifted = torch.roll(ref, 4, dims=3)  # the check can fail: a crop 4 pixels off is far worse
    assert ((images - shifted) * std * 255).abs().mean() > 2 * err.mean()


def test_jpegs_are_decoded_in_one_batched_call_others_per_file(tmp_path, monkeypatch):
    photos = write_photo_folder(tmp_path / "p", 5, size=(40, 30), classes=1)
    Image.fromarray(np.full((30, 40), 77, np.uint8), mode="L").save(photos / "c0" / "grey.png")
    Image.fromarray(np.full((30, 40), 99, np.uint8), mode="L").save(photos / "c0" / "grey.jpg")
    files = nv.EncodedFiles(SubsetImageFolder(photos))
    calls = []
    real = nv.decode_jpeg
    monkeypatch.setattr(nv, "decode_jpeg", lambda x, **kw: calls.append(len(x)) or real(x, **kw))
    datas = [files[i][0] for i in range(len(files))]
    images = nv.decode(datas, CPU)
    assert calls == [6]  # the five photos and the grey JPEG, together
    assert all(img.shape[0] == 3 and img.dtype == torch.uint8 for img in images)
    names = [p.rsplit("/", 1)[-1] for p, _ in files.samples]
    grey_png = images[names.index("grey.png")]
    assert grey_png.shape == (3, 30, 40) and (grey_png == 77).all()  # grey PNG -> RGB, per file
    assert (images[names.index("grey.jpg")].float() - 99).abs().max() <= 2


def test_the_next_batch_is_prepared_while_the_consumer_works(tmp_path, monkeypatch):
    """The producer runs ahead: while the consumer holds batch 0, batch 1 is being (or has been) prepared."""
    root = write_photo_folder(tmp_path / "p", 12, size=(40, 30), classes=2)
    loader = nv.NvJPEGLoader(SubsetImageFolder(root), 4, 0, CPU, train=True, image_size=16, color_ops="torch")
    started = []
    real = loader.prepare
    monkeypatch.setattr(loader, "prepare", lambda d, y, p, b: started.append(b) or real(d, y, p, b))
    it = iter(loader)
    next(it)
    import time
    deadline = time.time() + 10
    while len(started) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert started[:2] == [0, 1]
    assert len(list(it)) == 2  # and the epoch still ends with every batch once
