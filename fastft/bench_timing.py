"""What `fastft-bench` times, on the real training code: the Trainer's own epoch loop fed synthetic or real
batches, a clock at each phase of its step, and the logits/loss kernel against its torch reference.

Timing the Trainer's `train_epoch` (not a copy of it) means the numbers include everything a training step
does: lr schedule, autocast, MoCo + Feature Transformation, score statistics, backward, optimizer, periodic
logging. Each timed call is one short epoch: `warmup` untimed steps (worker start-up, cudnn autotuning), then
`steps` timed ones; epoch start and end costs (workers starting, score chunks flushed) stay outside the window.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from fastft.kernels import info_nce_loss

from .config import Config, ConfigError
from .loss import queue_dtype, select_loss


def device_sync(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work: without it host clocks time kernel launches, not kernels."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class SyntheticBatches:
    """The loader interface over one fixed batch already on the device, yielded `length` times: no data cost.

    Random views of the config's batch size and image size, float32 like the real loaders' output,
    channels-last when run.channels_last is set."""

    def __init__(self, cfg: Config, device: torch.device, length: int = 1 << 30):
        b, s = cfg.loader.batch_size, cfg.data.image_size
        fmt = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        g = torch.Generator().manual_seed(cfg.run.seed)
        self.v1, self.v2 = (torch.randn(b, 3, s, s, generator=g).to(device, memory_format=fmt) for _ in range(2))
        self.labels = torch.zeros(b, dtype=torch.long, device=device)
        self.length = length
        self.dataset = range(length * b)  # only its len() is ever read

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for _ in range(self.length):
            yield self.v1, self.v2, self.labels


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
    """

    def __init__(self, inner, warmup: int, steps: int, sync: Callable[[], None]):
        check_length(inner, warmup, steps)
        self.inner, self.warmup, self.steps, self.sync = inner, warmup, steps, sync
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


# The phases of Trainer.train_step, in order, each ending at the hook that marks it (PhaseClock).
PHASES = ("query encoder forward", "momentum update + key encoder forward", "feature transformation + loss forward",
          "score statistics + enqueue", "zero_grad + backward", "optimizer step")


class _MarkAfter:
    """A loss function that marks the clock when it returns; keeps the `fused` flag MoCo reads."""

    def __init__(self, fn, mark: Callable[[], None]):
        self.fn, self.mark = fn, mark
        self.fused = getattr(fn, "fused", False)

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.mark()
        return out


class PhaseClock:
    """Per-step phase durations of a Trainer, from hooks: MoCo forward (start, end), query and key encoder
    forward (end), the loss function (return), optimizer step (pre, post). Each mark synchronises the device,
    so a step under the clock runs a little slower than without it; `model` mode is the clean number.
    With run.compile the hooks break the compiled graphs: phases are then indicative only."""

    def __init__(self, trainer, sync: Callable[[], None]):
        self.sync = sync
        self.rows: list[list[float]] = []
        self._last = 0.0
        model, opt = trainer.model, trainer.optimizer
        self._model, self._loss_fn = model, model.loss_fn
        model.loss_fn = _MarkAfter(model.loss_fn, lambda: self._mark(2))
        self._handles = [
            model.register_forward_pre_hook(lambda *_: self._begin()),
            model.encoder_q.register_forward_hook(lambda *_: self._mark(0)),
            model.encoder_k.register_forward_hook(lambda *_: self._mark(1)),
            model.register_forward_hook(lambda *_: self._mark(3)),
            opt.register_step_pre_hook(lambda *_: self._mark(4)),
            opt.register_step_post_hook(lambda *_: self._mark(5)),
        ]

    def _begin(self) -> None:
        self.sync()
        self._last = time.perf_counter()
        self.rows.append([math.nan] * len(PHASES))

    def _mark(self, phase: int) -> None:
        if not self.rows:
            return
        self.sync()
        now = time.perf_counter()
        self.rows[-1][phase] = now - self._last
        self._last = now

    def mean_ms(self, last: int) -> list[float]:
        """Mean ms of each phase over the last `last` steps (a phase that did not run, e.g. an optimizer step
        the fp16 GradScaler skipped, counts as 0)."""
        rows = self.rows[-last:]
        return [1000 * sum(0.0 if math.isnan(r[p]) else r[p] for r in rows) / len(rows) for p in range(len(PHASES))]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._model.loss_fn = self._loss_fn


@dataclass
class StepTiming:
    images_per_s: float
    step_ms: float
    wait_fraction: float  # of the window's wall time, spent inside the loader's next()
    phases_ms: list[float] | None = None  # PhaseClock means, in PHASES order


def run_steps(trainer, source, warmup: int, steps: int, clock: PhaseClock | None = None) -> StepTiming:
    """One short epoch of trainer.train_epoch on `source`: `warmup` untimed steps, then `steps` timed ones."""
    timed = TimedLoader(source, warmup, steps, device_sync(trainer.device))
    trainer.loader, trainer.steps_per_epoch = timed, len(timed)
    trainer.train_epoch()
    batch = trainer.cfg.loader.batch_size
    return StepTiming(images_per_s=steps * batch / timed.elapsed, step_ms=1000 * timed.elapsed / steps,
                      wait_fraction=timed.wait / timed.elapsed,
                      phases_ms=clock.mean_ms(steps) if clock is not None else None)


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
        out["phases_ms"] = {name: statistics.median(r.phases_ms[p] for r in runs) for p, name in enumerate(PHASES)}
        out["runs_phases_total_ms"] = [sum(r.phases_ms) for r in runs]
        # Between the clocked phases: fetching the batch, lr schedule, score bookkeeping, logging.
        out["outside_phases_ms"] = statistics.median(r.step_ms - sum(r.phases_ms) for r in runs)
    return out


# -- the loss kernel ------------------------------------------------------------------------------------------


@dataclass
class KernelInputs:
    q: torch.Tensor
    k: torch.Tensor
    queue: torch.Tensor
    lam_p: float
    lam_n: float | torch.Tensor | None
    perm: torch.Tensor | None
    temperature: float


def kernel_inputs(cfg: Config, device: torch.device) -> KernelInputs:
    """MoCo-like features at the config's N (batch), K (queue), C (dim), queue dtype and FT variant."""
    n, k, c = cfg.loader.batch_size, cfg.model.queue_size, cfg.model.dim
    g = torch.Generator().manual_seed(cfg.run.seed)
    q = F.normalize(torch.randn(n, c, generator=g), dim=1).to(device)
    key = F.normalize(torch.randn(n, c, generator=g), dim=1).to(device)
    queue = F.normalize(torch.randn(k, c, generator=g), dim=1).to(device, queue_dtype(cfg.loss.queue_dtype))
    lam_p = {"extrapolate": 1.5, "interpolate": 0.5}.get(cfg.ft.pos, 1.0)  # the mean of each draw
    lam_n = perm = None
    if cfg.ft.neg == "interpolate":
        perm = torch.randperm(k, generator=g).to(device)
        lam_n = torch.rand(k, c, generator=g).to(device) if cfg.ft.dim_mask == "elementwise" else 0.5
    return KernelInputs(q, key, queue, lam_p, lam_n, perm, cfg.model.temperature)


def kernel_impls(cfg: Config, device: torch.device) -> tuple[dict, str, list[str]]:
    """({name: loss fn}, the name training uses (loss.kernel), notes on what could not be measured)."""
    impls, notes = {"torch": info_nce_loss}, []
    try:
        impls["triton"] = select_loss("triton", device)
        from fastft.kernels import infonce_triton

        if infonce_triton.INTERPRETED:
            notes.append("triton runs under the interpreter (TRITON_INTERPRET=1): its times measure numpy on the "
                         "CPU, not the kernel")
    except ConfigError as e:
        if device.type == "cpu":
            notes.append("triton not measured: on the CPU it runs only under TRITON_INTERPRET=1 (interpreted, slow, "
                         "not kernel speed); GPU numbers come from `bash scripts/gpu_check.sh`")
        else:
            notes.append(f"triton not measured: {e}")
    used = "triton" if getattr(select_loss(cfg.loss.kernel, device), "fused", False) else "torch"
    return impls, used, notes


def time_kernel(fn, x: KernelInputs, iters: int, sync: Callable[[], None]) -> float:
    """ms per forward + backward of the loss, as MoCo calls it (gradient to q through q_hat and k_hat)."""
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        q = x.q.detach().requires_grad_()
        q_hat, k_hat = x.lam_p * q + (1 - x.lam_p) * x.k, x.lam_p * x.k + (1 - x.lam_p) * q
        loss, _ = fn(q_hat, k_hat, x.queue, x.temperature, x.lam_n, x.perm)
        loss.backward()
    sync()
    return 1000 * (time.perf_counter() - start) / iters
