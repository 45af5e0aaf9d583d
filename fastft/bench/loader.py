"""Loader throughput, side by side: images/s (and images per CPU-second) of each installed backend's
pretrain_loader on the config's data, no model, against the outside baseline (moco_recipe.py: MoCo v2's own
ImageFolder + DataLoader, with the same batch size and workers); and the generated JPEGs (--synthetic-data) it
can run on.

Each backend first runs one untimed pass (worker start-up, FFCV's numba compilation); then the backends take
turns (A B C A B C ...), so that a slow spell of a shared machine hits all of them alike, and each turn times
`batches` batches after `warmup` batches of a fresh epoch. An image is two augmented views, as the trainer
consumes them.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from fastft.config import Config
from fastft.data import available_backends, is_builtin, pretrain_loader, split_folder

from . import moco_recipe
from .timing import Settings, interleaved, loader_plan, progress


def cpu_seconds() -> float:
    """CPU time of this process and its children (DataLoader workers) so far; 0 without psutil."""
    try:
        import psutil
    except ImportError:
        return 0.0
    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _time_epoch(loader, epoch: int, warmup: int, batches: int) -> tuple[float, float]:
    """(images/s, images per CPU-second) over `batches` batches after `warmup` ones of a fresh epoch.

    The second is what a loader gets out of the CPU it uses, whatever else runs on the machine: on a busy
    machine wall-clock rates favour whichever backend runs more threads.
    """
    loader.set_epoch(epoch)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    n, start, cpu = 0, time.perf_counter(), cpu_seconds()
    for _ in range(batches):
        v1, _, _ = next(it)
        n += v1.shape[0]
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    del it  # ends the epoch's workers/threads before the next backend's turn
    return n / elapsed, (n / cpu if cpu > 0 else float("nan"))


def bench_loaders(cfg: Config, backends: Sequence[str] | None = None, *, batches: int = 8, warmup: int = 2,
                  repeats: int = 5, device: torch.device | None = None, bar=None) -> dict:
    """{"backends": {name: {"images_per_s": median, "runs": [...], ...}}, "speedup": {name: x baseline}, ...}.

    The baseline (moco_recipe.NAME) always runs too, first. `bar`: a tqdm bar, advanced once per timed pass
    ((repeats + 1) x (len(backends) + 1) in all)."""
    backends = list(backends or available_backends())
    device = device or torch.device("cpu")
    loaders = {moco_recipe.NAME: moco_recipe.MocoRecipeLoader(split_folder(cfg, cfg.data.train_split),
                                                              cfg.loader.batch_size, cfg.loader.workers,
                                                              cfg.data.image_size, device)}
    for name in backends:
        loaders[name] = pretrain_loader(dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, backend=name)),
                                        device)
    for name in loaders:
        need = warmup + batches
        if len(loaders[name]) < need:
            raise ValueError(f"{name}: an epoch has {len(loaders[name])} batches; the bench needs {need} (--warmup, "
                             f"--steps, rounded up to whole waves of loader.workers): use fewer, or more images")
    # Pass 0 (untimed): start-up and compilation; then one fresh epoch per turn.
    passes = {name: (lambda epoch, ld=ld: _time_epoch(ld, epoch, warmup, batches)) for name, ld in loaders.items()}
    timed = interleaved(passes, repeats, bar=bar)
    runs = {name: [rate for rate, _ in v] for name, v in timed.items()}
    per_cpu = {name: [rate_cpu for _, rate_cpu in v] for name, v in timed.items()}
    med = {name: statistics.median(v) for name, v in runs.items()}
    med_cpu = {name: statistics.median(v) for name, v in per_cpu.items()}
    base, base_cpu = med[moco_recipe.NAME], med_cpu[moco_recipe.NAME]
    return {
        "baseline": moco_recipe.NAME,
        "backends": {name: {"images_per_s": med[name], "views_per_s": 2 * med[name], "runs": runs[name],
                            "images_per_cpu_s": med_cpu[name], "runs_per_cpu_s": per_cpu[name]} for name in loaders},
        "speedup": {name: med[name] / base for name in loaders},
        "speedup_per_cpu_s": {name: med_cpu[name] / base_cpu for name in loaders} if base_cpu == base_cpu else {},
        "batch_size": cfg.loader.batch_size, "workers": cfg.loader.workers, "image_size": cfg.data.image_size,
        "aug": cfg.loader.aug, "batches": batches, "warmup": warmup, "repeats": repeats, "device": str(device),
    }


def bench_loader(cfg: Config, device: torch.device, s: Settings, notes: list[str]) -> dict:
    """The `loader` mode: --backends (default: every installed one) over whole waves of loader.workers."""
    backends = list(s.backends or available_backends())
    if "ffcv" in backends and not is_builtin(cfg.data.path) and not cfg.loader.beton_dir:
        backends.remove("ffcv")  # it reads .beton files: none exist for this data without loader.beton_dir
        notes.append("loader: ffcv skipped (set loader.beton_dir to .beton files of this data)")
    warmup, steps = loader_plan(s, cfg.loader.workers)
    with progress((s.repeats + 1) * (len(backends) + 1), "loader") as bar:
        return bench_loaders(cfg, backends, batches=steps, warmup=warmup, repeats=s.repeats, device=device, bar=bar)


def with_synthetic_data(cfg: Config, n: int, root: Path) -> Config:
    """`cfg` reading `n` generated photo-like JPEGs (500x375) written as its train split under `root` (reused
    when already there), plus a .beton of them for FFCV where it is installed and loader.beton_dir is unset."""
    from fastft.pipelines.synthetic import write_synthetic_folder

    tqdm.write(f"fastft-bench: writing {n} synthetic JPEGs into {root}", file=sys.stderr)
    write_synthetic_folder(root / cfg.data.train_split, n)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(root)))
    if "ffcv" in available_backends() and not cfg.loader.beton_dir:
        cfg = _with_beton(cfg, root)
    return cfg


def _with_beton(cfg: Config, root: Path) -> Config:
    """The generated train split as a .beton beside it, stored as JPEG at its own resolution (as the source
    files), so FFCV is measured on the same images as the other backends."""
    from fastft.pipelines.convert import convert

    betons = root / "betons"
    beton = betons / f"{cfg.data.train_split}.beton"
    if not beton.is_file():
        betons.mkdir(parents=True, exist_ok=True)
        tqdm.write(f"fastft-bench: converting them to {beton}", file=sys.stderr)
        convert(str(root / cfg.data.train_split), beton, write_mode="jpg", force=True)
    return dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, beton_dir=str(betons)))
