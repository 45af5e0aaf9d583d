"""What score logging costs: the `scores` mode.

Full training steps (Trainer.train_epoch: MoCo forward with FT, backward, optimizer, score statistics) on a few
real batches from the config's loader held in memory, so that data loading is not in the step (the cost is a
share of compute alone: conservative), with score logging off, on (the features used in the loss) and on with
the untransformed features too (the default): three Trainers, interleaved, medians. Because the step times of
a shared machine are noisy, it also times the logging calls alone, which are steadier: ScoreRecorder.observe +
commit on one step's output, and a flush, and states them as a share of the median step without logging.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from fastft.config import Config
from fastft.data import pretrain_loader
from fastft.trainer import Trainer

from .step import HeldBatches, make_trainer, step_runner
from .timing import Settings, device_sync, interleaved, progress, summarize

# name -> (scores.enabled, scores.untransformed)
VARIANTS = {"off": (False, False), "on": (True, False), "on+untransformed": (True, True)}


def _variant_config(cfg: Config, name: str) -> Config:
    enabled, untransformed = VARIANTS[name]
    folder = name.replace("+", "-")
    return dataclasses.replace(
        cfg, scores=dataclasses.replace(cfg.scores, enabled=enabled, untransformed=untransformed),
        run=dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run.out_dir).with_name(f"scores-{folder}"))))


def logging_cost(trainer: Trainer, held: HeldBatches) -> dict:
    """ms of ScoreRecorder.observe + commit on one step's output (mean of up to 50) and of the flush after them."""
    rec, model, sync = trainer.scores, trainer.model, device_sync(trainer.device)
    v1, v2, _ = held.batches[0]
    with torch.no_grad():
        out = model(v1, v2, trainer.epoch, trainer.stats_bins)
    rec.flush()  # an empty chunk: the commits below never fill it
    reps = max(1, min(50, rec.capacity - 1))  # capacity: the resolved scores.flush_every
    sync()
    t0 = time.perf_counter()
    for i in range(reps):
        rec.observe(out, model.queue)
        rec.commit(trainer.step + 1 + i, trainer.epoch)
    sync()
    t1 = time.perf_counter()
    rec.flush()
    t2 = time.perf_counter()
    return {"observe_ms": 1000 * (t1 - t0) / reps, "flush_ms": 1000 * (t2 - t1),
            "flush_per_step_ms": 1000 * (t2 - t1) / rec.capacity}


def bench_scores(cfg: Config, device: torch.device, s: Settings) -> dict:
    held = HeldBatches.first_of(pretrain_loader(cfg, device), s.batches)
    trainers = {name: make_trainer(_variant_config(cfg, name), held) for name in VARIANTS}
    try:
        fns = {name: step_runner(t, held, s.warmup, s.steps) for name, t in trainers.items()}
        with progress((s.repeats + 1) * len(fns), "scores") as bar:
            runs = interleaved(fns, s.repeats, bar=bar)
        variants = {name: summarize(r) for name, r in runs.items()}
        off_ms = variants["off"]["step_ms"]
        for name, t in trainers.items():
            if t.scores is None:
                continue
            v = variants[name]
            v.update(logging_cost(t, held))
            v["vs_off"] = v["step_ms"] / off_ms - 1
            v["share_of_step"] = (v["observe_ms"] + v["flush_per_step_ms"]) / off_ms
    finally:
        for t in trainers.values():
            t.log.close()
    return {"batches": len(held.batches), "warmup": s.warmup, "steps": s.steps,
            "flush_every": trainers["on"].scores.capacity, "variants": variants}
