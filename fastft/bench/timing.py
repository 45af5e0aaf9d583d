"""How fastft-bench times anything: candidates side by side (A B A B ...), the device synchronised at the clock,
a window of whole loader waves, and medians over the repeats.

Each timed call is one short epoch: `warmup` untimed steps (worker start-up, cudnn autotuning), then `steps`
timed ones (TimedLoader); epoch start and end costs (workers starting, score chunks flushed) stay outside the
window.
"""
from __future__ import annotations

import datetime
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import torch
from tqdm import tqdm

R = TypeVar("R")


@dataclass
class Settings:
    steps: int = 10  # timed steps (or loader batches) per run
    warmup: int = 3  # untimed steps first, in every run
    repeats: int = 5  # interleaved runs per candidate; medians reported
    kernel_iters: int = 10  # forward + backward calls per kernel run
    backends: list[str] | None = None  # loader mode; None = every installed backend
    batches: int = 4  # scores mode: real batches held in memory and cycled


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


def progress(total: int, desc: str) -> tqdm:
    """A progress bar on a terminal; in a log (gpu_check.sh tees to a file) one line per mode instead."""
    if not sys.stderr.isatty():
        print(f"fastft-bench: {desc}: {total} runs ({datetime.datetime.now():%H:%M:%S})", file=sys.stderr, flush=True)
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, leave=False, disable=None)


def device_sync(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work: without it host clocks time kernel launches, not kernels."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def loader_plan(s: Settings, workers: int) -> tuple[int, int]:
    """(warm-up, timed) batches for runs through a real loader: --warmup and --steps rounded up to whole waves.

    Each DataLoader worker builds whole batches, so after start-up the first `workers` batches arrive together,
    and the next ones a batch-time later: timing batches out of the first wave would measure the prefetch
    buffer, not the loader. A window that opens after whole waves and spans whole waves measures the steady
    rate, whether the workers stay in step or drift apart."""
    if workers <= 0:
        return s.warmup, s.steps

    def whole_waves(n: int) -> int:
        return -(-max(n, 1) // workers) * workers

    return whole_waves(s.warmup), whole_waves(s.steps)


def check_length(loader, warmup: int, steps: int) -> None:
    if len(loader) < warmup + steps:
        raise ValueError(f"an epoch of the loader has {len(loader)} batches; the bench needs {warmup} warm-up + "
                         f"{steps} timed = {warmup + steps} (--warmup, --steps, rounded up to whole waves of "
                         f"loader.workers): use fewer, a smaller loader.batch_size or more images (--synthetic-data N)")


class TimedLoader:
    """Wraps a loader for Trainer.train_epoch: the wall time of `steps` steps after `warmup` ones, and how much
    of it was spent inside the wrapped loader's `next()` (waiting for data, including the copy to the device).

    The window opens when batch `warmup` is asked for and closes when batch `warmup + steps` is (that is, when
    step `warmup + steps - 1` is done), with the device synchronised at both ends; the epoch then ends.
    `on_request` is called at every request for a batch, first thing: the end of the previous step.
    """

    def __init__(self, inner, warmup: int, steps: int, sync: Callable[[], None],
                 on_request: Callable[[], None] | None = None):
        check_length(inner, warmup, steps)
        self.inner, self.warmup, self.steps, self.sync = inner, warmup, steps, sync
        self.on_request = on_request or (lambda: None)
        self.dataset = inner.dataset
        self.elapsed = self.wait = math.nan

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return self.warmup + self.steps + 1  # +1: asking for it closes the window; it is never yielded

    def __iter__(self):
        it = iter(self.inner)
        start = wait = 0.0
        for i in range(self.warmup + self.steps + 1):
            self.on_request()
            if i == self.warmup:
                self.sync()
                start = time.perf_counter()
            if i == self.warmup + self.steps:
                self.sync()
                self.elapsed, self.wait = time.perf_counter() - start, wait
                return
            t = time.perf_counter()
            batch = next(it)
            if i >= self.warmup:
                wait += time.perf_counter() - t
            yield batch


@dataclass
class StepTiming:
    images_per_s: float
    step_ms: float
    wait_fraction: float  # of the window's wall time, spent inside the loader's next()
    phases_ms: dict[str, float] | None = None  # phase clock means (fastft.bench.step.PHASES)


def summarize(runs: list[StepTiming]) -> dict:
    """Medians over repeats (and the runs themselves, for the record)."""
    out = {
        "images_per_s": statistics.median(r.images_per_s for r in runs),
        "step_ms": statistics.median(r.step_ms for r in runs),
        "data_wait_fraction": statistics.median(r.wait_fraction for r in runs),
        "runs_images_per_s": [r.images_per_s for r in runs],
        "runs_step_ms": [r.step_ms for r in runs],
    }
    out["views_per_s"] = 2 * out["images_per_s"]
    if runs and runs[0].phases_ms is not None:
        out["phases_ms"] = {name: statistics.median(r.phases_ms[name] for r in runs) for name in runs[0].phases_ms}
        out["runs_phases_total_ms"] = [sum(r.phases_ms.values()) for r in runs]
        # Outside the clocked phases: fetching the batch, the lr schedule, entering autocast.
        out["outside_phases_ms"] = statistics.median(r.step_ms - sum(r.phases_ms.values()) for r in runs)
    return out
