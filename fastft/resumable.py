"""What every resumable run shares, pretraining (fastft/trainer.py) and the linear probe (fastft/linear.py):
epochs and steps counted, checkpoints written atomically and resumed exactly (every rank's random streams
included), metrics logged once per step even across resumes, progress bars, job-slot limits, the atomic summary.

A subclass says what its checkpoint holds (`state` / `restore`), what one epoch of training is (`train_epoch`)
and what happens after each epoch (`end_epoch`); `fit` runs the loop.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint as ckpt_io
from .atomic import write_json
from .config import RunConfig
from .distributed import all_gather_objects, all_reduce_mean, barrier, broadcast_object, is_main, rank, world_size
from .metrics import FILE as METRICS, MetricsLog
from .pipelines.stale import remove_stale


class ResumableRun:
    name = "fastft"  # how messages name the run ("linear probe", ...)

    def __init__(self, out_dir: str | Path, epochs: int, run: RunConfig, resume: str, resume_key: str = "run.resume"):
        self.out_dir = Path(out_dir)
        self.epochs = epochs  # the target
        self.run_cfg = run
        self.resume_mode = resume  # auto | none | a checkpoint path
        self.resume_key = resume_key  # the config key it came from, for messages
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.history: list[float] = []  # mean training loss of each completed epoch
        self.log = MetricsLog(self.out_dir, enabled=is_main(), tensorboard=run.tensorboard)

    # -- what a subclass provides ----------------------------------------------------------------------------
    def state(self) -> dict:
        """The run's own part of a checkpoint (weights, optimizer, ...)."""
        raise NotImplementedError

    def restore(self, ckpt: dict, path: Path) -> None:
        """Check that checkpoint `path` fits this run (raise CheckpointError saying why not) and load its part."""
        raise NotImplementedError

    def rng_extra(self) -> dict:
        """Random streams of the run's own beyond the process-wide ones (checkpointed per rank)."""
        return {}

    def load_rng_extra(self, state: dict) -> None:
        pass

    def train_epoch(self) -> float:
        """One epoch; returns its mean loss over every rank."""
        raise NotImplementedError

    def end_epoch(self, loss: float) -> dict:
        """After each epoch (evaluations): the record to log, with at least kind, step and epoch."""
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if is_main():
            tqdm.write(msg)

    def live_progress(self) -> bool:
        """A live bar on a terminal only: in a log file its redraws pile up as carriage-return frames, so there
        each epoch ends in one summary line instead (`end_epoch`)."""
        return self.run_cfg.progress and is_main() and sys.stderr.isatty()

    def progress(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not self.live_progress())

    def checkpoint(self) -> dict:
        rngs = all_gather_objects({**ckpt_io.rng_state(), **self.rng_extra()})  # every rank's streams
        return {"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "epoch": self.epoch, "step": self.step,
                "history": self.history, "rng": rngs, "world_size": world_size(), **self.state()}

    def save(self) -> None:
        ckpt = self.checkpoint()  # a collective: every rank takes part, rank 0 writes
        if is_main():
            ckpt_io.save(ckpt, self.out_dir, self.epoch, self.run_cfg.keep_ckpts)
        barrier()

    def load(self, ckpt: dict, path: Path) -> None:
        self.restore(ckpt, path)
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # probes before 0.2: one dict
        if len(rngs) == world_size():  # each rank continues its own random streams
            ckpt_io.set_rng_state(rngs[rank()])
            self.load_rng_extra(rngs[rank()])
        else:
            self.say(f"warning: {path} was written by {len(rngs)} process(es), this run has {world_size()}: "
                     f"random streams restart, so the run continues but not bit for bit")
        self.epoch, self.step, self.history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
        self.log.truncate_after(self.step)

    def resume(self) -> Path | None:
        """auto: the newest checkpoint that loads (picked on rank 0 for every rank); none: start afresh (earlier
        checkpoints set aside, never deleted); or the path of a checkpoint. See `_pick` for files that do not load.
        Returns the checkpoint resumed from (None: a fresh start). Nothing is written before this decision, but
        the temp files of writers that were killed are removed (on rank 0, the run folder's one writer), and
        metrics.jsonl is cut back to what the checkpoint holds (none of it on a fresh start), so that it holds
        each (kind, step) once however often the run was restarted."""
        if is_main():
            for path in remove_stale(self.out_dir, recursive=True):
                self.say(f"{self.name}: removed {path}, left by a writer that was killed")
        if self.resume_mode not in ("auto", "none"):
            path = Path(self.resume_mode)
            self.load(ckpt_io.load(path), path)
            return path
        found, refusal = self._pick() if is_main() else (None, None)
        chosen, refusal = broadcast_object((str(found[0]) if found else None, refusal))
        if refusal is not None:
            raise ckpt_io.CheckpointError(refusal)
        if chosen is None:
            self.log.truncate_after(-1)  # records of an attempt killed before its first checkpoint
            return None
        path = Path(chosen)
        self.load(found[1] if found else ckpt_io.load(path), path)
        return path

    def _pick(self) -> tuple[tuple[Path, dict] | None, str | None]:
        """Rank 0's choice: (the checkpoint to resume from, or None; the reason to stop instead, or None).

        Files that do not load are moved into checkpoints/unreadable/; when nothing else is there, the run stops
        and asks for a decision (resume = none) rather than start afresh beside them on its own."""
        if self.resume_mode == "none":
            ckpt_io.set_aside_all(self.out_dir)
            if (self.out_dir / METRICS).is_file():  # the earlier run's records go with its checkpoints
                ckpt_io.set_aside(self.out_dir / METRICS, ckpt_io.EARLIER, "this run starts afresh",
                                  folder=self.out_dir / "checkpoints" / ckpt_io.EARLIER)
            return None, None
        found, unreadable = ckpt_io.scan(self.out_dir)
        if found is None and unreadable:
            names = "; ".join(why for _, why in unreadable)
            return None, (f"{self.out_dir / 'checkpoints'} holds no checkpoint that loads ({names}). Nothing was "
                          f"resumed or written: look at them, or pass {self.resume_key}=none to move them into "
                          f"checkpoints/{ckpt_io.UNREADABLE}/ and start afresh")
        for path, why in unreadable:
            ckpt_io.set_aside(path, ckpt_io.UNREADABLE, why)
        return found, None

    def fit(self) -> int:
        """Train up to `epochs` (or run.epochs_per_job more); returns the number of epochs run now."""
        ran = 0
        while self.epoch < self.epochs:
            if self.run_cfg.epochs_per_job and ran >= self.run_cfg.epochs_per_job:
                self.say(f"{self.name}: stopping after {ran} epoch(s) as run.epochs_per_job asks; run again to "
                         f"resume")
                break
            loss = self.train_epoch()
            ran += 1
            self.history.append(loss)
            self.log.log(self.end_epoch(loss))
            if self.epoch % self.run_cfg.ckpt_every == 0 or self.epoch == self.epochs:
                self.save()
        return ran

    def write_summary(self, name: str, record: dict[str, Any]) -> None:
        if is_main():
            write_json(self.out_dir / name, record)


def bad_images_record(loader) -> dict:
    """An epoch record's count of unreadable images replaced since the last record (pipelines/bad_images.py),
    summed over every rank, and the files first met ({} for a loader without the policy, e.g. synthetic)."""
    bad = getattr(loader, "bad", None)
    if bad is None:
        return {}
    per_rank = all_gather_objects(bad.take())
    files = sorted({f for _, new in per_rank for f in new})
    return {"bad_images": sum(n for n, _ in per_rank), **({"bad_files": files} if files else {})}


def mean_loss(losses: torch.Tensor) -> float:
    """The mean of an epoch's per-step losses (kept on the device: no sync per step) over every rank."""
    return all_reduce_mean(losses.mean()).item()
