"""Loader throughput, side by side: images/s of each backend's pretrain_loader on one config.

    python -m fastft.pipelines.bench                  # ImageNet-sized JPEGs made from the bundled photographs
    python -m fastft.pipelines.bench --photos 384 --batch 32 --workers 2 --repeats 5

`bench_loaders(cfg, backends)` is the function `fastft-bench loader` calls. Each backend first runs one
untimed pass (worker start-up, FFCV's numba compilation); then the backends take turns (A B C A B C ...), so
that a slow spell of a shared machine hits all of them alike, and each turn times `batches` batches after
`warmup` batches of a fresh epoch. An image is two augmented views, as the trainer consumes them.

`interleaved(fns, repeats)` is that side-by-side scheme on its own; every mode of `fastft-bench` times its
comparisons with it (it lives here because pipelines/ must not import the core package).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence, TypeVar

import torch

from fastft.config import Config, load_config

from .loader import available_backends, pretrain_loader


R = TypeVar("R")


def interleaved(fns: Mapping[str, Callable[[int], R]], repeats: int, *, warmup: bool = True,
                bar=None) -> dict[str, list[R]]:
    """Each fn's `repeats` results, measured side by side: fn(0) once each, untimed (start-up, compilation,
    caches; skipped with warmup=False), then turns A B C A B C ... with fn(1) .. fn(repeats).

    Interleaving makes a slow spell of a shared machine hit every candidate alike, where running A's repeats
    and then B's would charge it to one of them; callers report medians. The index lets a fn use a fresh
    epoch per call. `bar`: a tqdm bar advanced by one per call.
    """
    def call(fn: Callable[[int], R], i: int) -> R:
        out = fn(i)
        if bar is not None:
            bar.update(1)
        return out

    if warmup:
        for fn in fns.values():
            call(fn, 0)
    runs: dict[str, list[R]] = {name: [] for name in fns}
    for r in range(1, repeats + 1):
        for name, fn in fns.items():
            runs[name].append(call(fn, r))
    return runs


def _cpu_seconds() -> float:
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
    n, start, cpu = 0, time.perf_counter(), _cpu_seconds()
    for _ in range(batches):
        v1, _, _ = next(it)
        n += v1.shape[0]
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    del it  # ends the epoch's workers/threads before the next backend's turn
    return n / elapsed, (n / cpu if cpu > 0 else float("nan"))


def bench_loaders(cfg: Config, backends: Sequence[str] | None = None, *, batches: int = 8, warmup: int = 2,
                  repeats: int = 5, device: torch.device | None = None, bar=None) -> dict:
    """{"backends": {name: {"images_per_s": median, "runs": [...]}}, "speedup": {name: x torchvision}, ...}.

    `bar`: a tqdm bar, advanced once per timed pass ((repeats + 1) x len(backends) in all)."""
    backends = list(backends or available_backends())
    device = device or torch.device("cpu")
    loaders = {}
    for name in backends:
        c = dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, backend=name))
        loaders[name] = pretrain_loader(c, device)
        need = warmup + batches
        if len(loaders[name]) < need:
            raise ValueError(f"{name}: an epoch has {len(loaders[name])} batches; the bench needs {need} "
                             f"(more images, or fewer --batches)")
    # Pass 0 (untimed): start-up and compilation; then one fresh epoch per turn.
    passes = {name: (lambda epoch, ld=ld: _time_epoch(ld, epoch, warmup, batches)) for name, ld in loaders.items()}
    timed = interleaved(passes, repeats, bar=bar)
    runs = {name: [rate for rate, _ in v] for name, v in timed.items()}
    per_cpu = {name: [rate_cpu for _, rate_cpu in v] for name, v in timed.items()}
    med = {name: statistics.median(v) for name, v in runs.items()}
    med_cpu = {name: statistics.median(v) for name, v in per_cpu.items()}
    base, base_cpu = med.get("torchvision"), med_cpu.get("torchvision")
    return {
        "backends": {name: {"images_per_s": med[name], "runs": runs[name], "images_per_cpu_s": med_cpu[name],
                            "runs_per_cpu_s": per_cpu[name]} for name in backends},
        "speedup": {name: med[name] / base for name in backends} if base else {},
        "speedup_per_cpu_s": {name: med_cpu[name] / base_cpu for name in backends} if base_cpu else {},
        "batch_size": cfg.loader.batch_size, "workers": cfg.loader.workers, "image_size": cfg.data.image_size,
        "aug": cfg.loader.aug, "batches": batches, "warmup": warmup, "repeats": repeats, "device": str(device),
    }


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def markdown(result: dict) -> str:
    rows = ["| backend | images/s (median) | x torchvision | images per CPU-second (median) | x torchvision | "
            "runs (images/s) |", "|---|---|---|---|---|---|"]
    for name, r in result["backends"].items():
        x = result["speedup"].get(name, float("nan"))
        xc = result["speedup_per_cpu_s"].get(name, float("nan"))
        runs = ", ".join(f"{v:.0f}" for v in r["runs"])
        rows.append(f"| {name} | {r['images_per_s']:.1f} | {x:.2f} | {r['images_per_cpu_s']:.1f} | {xc:.2f} | "
                    f"{runs} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastft.pipelines.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=384, help="JPEGs to make from the bundled photographs")
    p.add_argument("--size", default="500x375", help="their size, WxH (ImageNet's average; every third portrait)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers = DALI threads = FFCV threads")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--aug", default="mocov2", choices=["mocov1", "mocov2"])
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backends", default=",".join(available_backends()))
    p.add_argument("--dir", help="working folder (default: a temporary one)")
    args = p.parse_args(argv)
    from .convert import convert
    from .photos import write_photo_folder

    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="fastft-bench-") as tmp:
        work = Path(args.dir or tmp)
        root = work / "data"
        if not (root / "train").is_dir():
            write_photo_folder(root / "train", args.photos, size=(w, h))
        betons = work / "betons"
        betons.mkdir(parents=True, exist_ok=True)
        if "ffcv" in args.backends and not (betons / "train.beton").is_file():
            # Stored at their own resolution, as JPEG (quality 90), like the source files.
            convert(str(root / "train"), betons / "train.beton", write_mode="jpg", force=True)
        cfg = load_config(None, [f"data.path={root}", f"data.image_size={args.image_size}",
                                 f"loader.batch_size={args.batch}", f"loader.workers={args.workers}",
                                 f"loader.aug={args.aug}", f"loader.beton_dir={betons}", "run.device=cpu"])
        load = os.getloadavg()
        result = bench_loaders(cfg, args.backends.split(","), batches=args.batches, warmup=args.warmup,
                               repeats=args.repeats)
        load_after = os.getloadavg()
    print(f"# {datetime.datetime.now().isoformat(timespec='minutes')}: {' '.join(sys.argv)}")
    print(f"# {machine()}; load average before {load[0]:.2f}, after {load_after[0]:.2f}")
    print(f"# {args.photos} JPEGs {w}x{h}, {args.aug} two views at {args.image_size}, batch {args.batch}, "
          f"{args.workers} workers/threads, {args.repeats} interleaved repeats of {args.batches} batches")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
