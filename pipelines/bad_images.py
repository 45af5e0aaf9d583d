"""The bad-image policy every backend shares: what an unreadable file (corrupt, truncated, not an image, empty)
does to a run.

    skip   (default) the file is named once in a warning, replaced so that batch shapes hold (torchvision: by the
           next image in dataset order that reads; DALI: left out of the file list by a pre-scan), and counted
    error  the run stops with one line naming the file

Either way a run stops when more than `max_fraction` of the images it reads are unreadable: that is a broken
dataset (a bad mount, a half-finished copy), not a few bad files. `find_bad` is the check `fastft-check-dataset`
runs before a long run and the one the DALI loader runs on its file list (DALI cannot skip a file mid-batch);
`fastft-convert-dataset` judges files with the same `load_rgb`, so the .beton the ffcv backend reads holds
none.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image

POLICIES = ("skip", "error")
# What counts as an image file (the converter's and fastft-check-dataset's scans; ImageFolder's own list matches).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(RuntimeError):
    """An unreadable image under `error`, or too many of them under `skip`: one line, naming the file."""


class UnreadableImage(RuntimeError):
    """`load_rgb` could not read `path`; `reason` says why (PIL's error type and text)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path, self.reason = path, reason


def load_rgb(path: str, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open an image as RGB, fully decoded; a file that is not an image, or is truncated, raises UnreadableImage.
    `draft`: let JPEG decode at a reduced scale (still reading every byte: truncation is still found)."""
    try:
        with Image.open(path) as img:  # by path: PIL's errors then name it, not a file object
            if draft is not None:
                img.draft("RGB", draft)
            return img.convert("RGB")
    except Exception as e:  # PIL raises several types; the path and the reason are what the user needs
        text = " ".join(str(e).split())
        raise UnreadableImage(path, f"{type(e).__name__}: {text}" if text else type(e).__name__) from e


def check_image(path: str) -> str | None:
    """Why `path` cannot be read as an image, or None when it can. JPEGs are decoded at 1/8 scale (fast)."""
    try:
        load_rgb(path, draft=(1, 1))
    except UnreadableImage as e:
        return e.reason
    return None


def find_bad(paths: Iterable[str], workers: int = 0) -> list[tuple[str, str]]:
    """(path, reason) of every file in `paths` that does not read, in the given order. PIL releases the GIL while
    decoding, so threads parallelise the check."""
    paths = list(paths)
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max(1, workers)) as pool:
        reasons = list(pool.map(check_image, paths, chunksize=64))
    return [(p, why) for p, why in zip(paths, reasons) if why is not None]


def find_bad_cached(paths: list[str], workers: int, cache_dir: str | Path) -> dict[str, str]:
    """find_bad's answer as {path: reason}, remembered in `cache_dir`/image-checks/ under a fingerprint of every
    file's (path, size, mtime): a run over the same files does not decode them again; any change checks anew."""
    digest = hashlib.sha1()
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache = Path(cache_dir).expanduser() / "image-checks" / f"{digest.hexdigest()}.json"
    try:
        return json.loads(cache.read_text())["unreadable"]
    except (OSError, ValueError, KeyError):
        pass
    unreadable = dict(find_bad(paths, workers))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")  # whole or absent; a killed writer's: stale.py
    tmp.write_text(json.dumps({"files": len(paths), "unreadable": unreadable}))
    os.replace(tmp, cache)
    return unreadable


@dataclass(frozen=True)
class BadImagePolicy:
    on_bad: str = "skip"  # one of POLICIES
    max_fraction: float = 0.01  # stop when more than this share of the images read are unreadable


_named: set[str] = set()  # files this process has warned about: each is named once, however often it is read


@dataclass
class BadImages:
    """One loader's tally: applies the policy to each unreadable file met, counts them per epoch."""
    policy: BadImagePolicy
    total: int  # images this loader reads per epoch: the base of max_fraction
    where: str  # the dataset, for messages
    found: dict[str, str] = field(default_factory=dict)  # every distinct bad file met: path -> reason
    count: int = 0  # replacements since the last take()
    new: list[str] = field(default_factory=list)  # files first met since the last take()

    def report(self, path: str, reason: str) -> None:
        if self.policy.on_bad == "error":
            raise BadImageError(f"unreadable image {path} ({reason}); on_bad_image=skip would skip it, "
                                f"fastft-check-dataset lists every such file")
        self.count += 1
        if path in self.found:
            return
        self.found[path] = reason
        self.new.append(path)
        if path not in _named:
            _named.add(path)
            print(f"warning: skipping unreadable image {path} ({reason}); replaced by another image",
                  file=sys.stderr, flush=True)
        limit = self.policy.max_fraction * self.total
        if len(self.found) > limit:
            raise BadImageError(f"{len(self.found)} of the {self.total} images read from {self.where} are "
                                f"unreadable, more than max_bad_fraction = {self.policy.max_fraction}: check the "
                                f"dataset with `fastft-check-dataset {self.where}` (last: {path}: {reason})")

    def take(self) -> tuple[int, list[str]]:
        """(replacements, files first met) since the last call: what an epoch's record counts."""
        out = (self.count, self.new)
        self.count, self.new = 0, []
        return out


class Replacing:
    """A map-style dataset whose items never fail to read: item i is (dataset[j], bad) with j the first index
    from i on (wrapping) whose image reads, and bad the (path, reason) of those passed over. The loader's main
    process applies the policy to `bad` (a worker's exception would arrive wrapped in a traceback)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        bad = []
        n = len(self.dataset)
        for j in range(i, i + n):
            try:
                return self.dataset[j % n], bad
            except UnreadableImage as e:
                bad.append((e.path, e.reason))
        raise BadImageError(f"no image of {getattr(self.dataset, 'root', 'the dataset')} can be read "
                            f"(first: {bad[0][0]}: {bad[0][1]})")


def collate(items: list) -> tuple:
    """DataLoader collate for Replacing's items: (the batch as default_collate makes it, every bad (path, reason))."""
    from torch.utils.data import default_collate

    samples, bads = zip(*items)
    return default_collate(list(samples)), [b for bad in bads for b in bad]
