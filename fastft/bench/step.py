"""The training step, timed on the real Trainer: model-only, end to end, and a clock at each phase of the step.

Timing `Trainer.train_epoch` (not a copy of it) means the numbers include everything a training step does: lr
schedule, autocast, MoCo + Feature Transformation, score statistics, backward, optimizer, periodic logging.
The bench hands it a TimedLoader and its length; it never sets a Trainer field. The phase clock reads only
public hooks (module forward hooks, optimizer step hooks) and the TimedLoader's batch requests.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Callable, Iterator

import torch

from fastft.config import Config
from fastft.trainer import Trainer

from .timing import (Settings, StepTiming, TimedLoader, check_length, device_sync, interleaved, loader_plan, progress,
                     summarize)

# The phases of one step of Trainer.train_epoch, in order, each ending at the mark of PhaseClock. The last one
# is everything after the optimizer step until the next batch is asked for (GradScaler update, score statistics,
# MoCo.enqueue, score commit, progress and metrics logging).
PHASES = ("query encoder forward", "momentum update + key encoder forward", "feature transformation + loss forward",
          "zero_grad + backward", "optimizer step", "score statistics + enqueue + logging")


class HeldBatches:
    """The loader interface over a few batches already on the device, cycled `length` times: no data cost."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], length: int = 1 << 30):
        if not batches:
            raise ValueError("HeldBatches needs at least one batch")
        self.batches, self.length = batches, length
        self.dataset = range(length * batches[0][0].shape[0])  # only its len() is ever read

    @classmethod
    def synthetic(cls, cfg: Config, device: torch.device) -> HeldBatches:
        """One batch of random views at the config's batch size and image size, float32 like the real loaders'
        output, channels-last when run.channels_last is set."""
        b, s = cfg.loader.batch_size, cfg.data.image_size
        fmt = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
        g = torch.Generator().manual_seed(cfg.run.seed)
        v1, v2 = (torch.randn(b, 3, s, s, generator=g).to(device, memory_format=fmt) for _ in range(2))
        return cls([(v1, v2, torch.zeros(b, dtype=torch.long, device=device))])

    @classmethod
    def first_of(cls, loader, n: int) -> HeldBatches:
        """Copies of the first `n` batches of an epoch of `loader` (or all it has): a fast loader may reuse its
        output buffers."""
        loader.set_epoch(0)
        return cls([tuple(t.clone() for t in batch) for batch in itertools.islice(loader, n)])

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for i in range(self.length):
            yield self.batches[i % len(self.batches)]


def make_trainer(cfg: Config, loader=None) -> Trainer:
    """The real Trainer, writing into cfg.run.out_dir (a temp folder), on `loader` or (None) the config's own,
    with its run folder and score files ready."""
    trainer = Trainer(cfg, loader=loader)
    trainer.prepare()
    return trainer


class PhaseClock:
    """Per-step phase durations of a Trainer (PHASES). Marks: MoCo forward starts (the step begins), query and
    key encoder forward end, the loss module's forward ends, the optimizer step starts (zero_grad + backward
    done) and ends, and `end_step` (the TimedLoader's next batch request). Each mark synchronises the device,
    so a step under the clock runs a little slower than without it; `model` mode is the clean number.

    With run.compile the hooks break the compiled graphs: phases are then indicative only. An optimizer step
    that fp16's GradScaler skips fires no optimizer hook: that step's backward counts in the last phase."""

    def __init__(self, trainer: Trainer, sync: Callable[[], None]):
        self.sync = sync
        self.rows: list[list[float]] = []
        self._last = 0.0
        self._open = False  # inside a step: between its forward start and the next batch request
        model, opt = trainer.model, trainer.optimizer
        self._handles = [
            model.register_forward_pre_hook(lambda *_: self._begin()),
            model.encoder_q.register_forward_hook(lambda *_: self._mark(0)),
            model.encoder_k.register_forward_hook(lambda *_: self._mark(1)),
            model.loss.register_forward_hook(lambda *_: self._mark(2)),
            opt.register_step_pre_hook(lambda *_: self._mark(3)),
            opt.register_step_post_hook(lambda *_: self._mark(4)),
        ]

    def _begin(self) -> None:
        self.sync()
        self._last = time.perf_counter()
        self.rows.append([math.nan] * len(PHASES))
        self._open = True

    def _mark(self, phase: int) -> None:
        if not self._open:
            return
        self.sync()
        now = time.perf_counter()
        self.rows[-1][phase] = now - self._last
        self._last = now

    def end_step(self) -> None:
        self._mark(len(PHASES) - 1)
        self._open = False

    def mean_ms(self, last: int) -> dict[str, float]:
        """Mean ms of each phase over the last `last` steps (a phase that did not run, e.g. an optimizer step
        the fp16 GradScaler skipped, counts as 0)."""
        rows = self.rows[-last:]
        return {name: 1000 * sum(0.0 if math.isnan(r[p]) else r[p] for r in rows) / len(rows)
                for p, name in enumerate(PHASES)}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def run_steps(trainer: Trainer, source, warmup: int, steps: int, clock: PhaseClock | None = None) -> StepTiming:
    """One short epoch of trainer.train_epoch on `source`: `warmup` untimed steps, then `steps` timed ones."""
    timed = TimedLoader(source, warmup, steps, device_sync(trainer.device), clock.end_step if clock else None)
    trainer.train_epoch(timed, len(timed))
    batch = trainer.cfg.loader.batch_size
    return StepTiming(images_per_s=steps * batch / timed.elapsed, step_ms=1000 * timed.elapsed / steps,
                      wait_fraction=timed.wait / timed.elapsed,
                      phases_ms=clock.mean_ms(steps) if clock is not None else None)


def step_runner(trainer: Trainer, source, warmup: int, steps: int, clock: PhaseClock | None = None):
    """The fn for `interleaved`: its untimed first call (index 0) is warm-up + one step."""
    return lambda i: run_steps(trainer, source, warmup, steps if i else 1, clock)


def bench_model_train(trainer: Trainer, synthetic: HeldBatches, s: Settings, with_train: bool) -> dict:
    """model-only (and end to end through the trainer's own loader, interleaved with it)."""
    fns = {"model": step_runner(trainer, synthetic, s.warmup, s.steps)}
    plan = {"model": (s.warmup, s.steps)}
    if with_train:
        plan["train"] = loader_plan(s, trainer.cfg.loader.workers)
        check_length(trainer.loader, *plan["train"])  # before any timing, not after minutes of it
        fns["train"] = step_runner(trainer, trainer.loader, *plan["train"])
    with progress((s.repeats + 1) * len(fns), "model/train" if with_train else "model") as bar:
        runs = interleaved(fns, s.repeats, bar=bar)
    out = {name: {**summarize(r), "warmup": plan[name][0], "steps": plan[name][1]} for name, r in runs.items()}
    if with_train:
        out["train"]["backend"] = trainer.cfg.loader.backend
        out["train"]["workers"] = trainer.cfg.loader.workers
    return out


def bench_step(trainer: Trainer, synthetic: HeldBatches, s: Settings) -> dict:
    clock = PhaseClock(trainer, device_sync(trainer.device))
    try:
        with progress(s.repeats + 1, "step") as bar:
            runs = interleaved({"step": step_runner(trainer, synthetic, s.warmup, s.steps, clock)}, s.repeats,
                               bar=bar)
    finally:
        clock.close()
    return summarize(runs["step"])
