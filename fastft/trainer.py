"""Pretraining: the loader, MoCo + Feature Transformation, the loss kernel, score logging and checkpoints wired
into one resumable training loop (the CLI is fastft/train.py; fastft-bench times this same loop).

    trainer = Trainer(cfg)          # joins the torchrun group, builds loader, model, optimizer, logging
    summary = trainer.run()         # resume, kNN at init, the epochs, the summary

Public pieces other tools use: `train_epoch(loader, steps)` runs one epoch of the real step on any batches
with the loader interface (set_epoch, len, (view1, view2, labels)); `prepare()` readies the run folder.
"""
from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt_io
from .atomic import write_text
from .config import Config, ConfigError
from .data import pretrain_loader
from .device import loss_tf32, pick_device, pick_precision, set_threads
from .distributed import all_reduce_mean, barrier, broadcast_module, is_main, no_buffer_sync, rank, setup, world_size
from .knn import evaluate_knn, knn_report
from .loss import queue_dtype, select_loss
from .metrics import read_metrics
from .moco import MoCo, key_bn_mode
from .resumable import ResumableRun, bad_images_record, mean_loss
from .schedule import base_lr, lr_at
from .score_stats import ScoreRecorder, ScoreStore, chunk_steps
from .sync_bn import convert_sync_bn

SUMMARY = "summary.json"
# DDP's gradient buckets, smaller than torch's 25 MB: the last bucket can only be reduced once backward is done, so
# it is what the step waits for between nodes (ResNet-50: 21.8 MB with 25 MB buckets, 1.9 MB with 10; measured
# and modelled by `fastft-bench ddp`, README "Scaling note").
DDP_BUCKET_MB = 10


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Fewer values per channel than this in a split BN group's deepest batch norm normalise to noise (at 8x8 with a
# small stem, 2 images per group gave kNN at chance after 2 steps where plain BN kept the random-init 0.83).
MIN_BN_VALUES = 8


def check_key_bn(cfg: Config, world: int) -> list[str]:
    """Warnings for a `model.key_bn` that cannot work as asked at this world size; a ConfigError for bn_splits
    that does not divide the batch per process."""
    m = cfg.model
    mode = key_bn_mode(m, world)
    if mode == "split" and cfg.loader.batch_size % m.bn_splits:
        raise ConfigError(f"model.bn_splits = {m.bn_splits} does not divide loader.batch_size = "
                          f"{cfg.loader.batch_size} (the batch per process): split batch norm needs equal groups; "
                          f"pick a divisor of {cfg.loader.batch_size} or another batch size")
    if mode == "split" and m.bn_splits == 1:
        return ["model.key_bn = split with model.bn_splits = 1 is plain batch norm: no defence against the "
                "BatchNorm shortcut (8 groups is FAIR's single-GPU MoCo)"]
    if mode == "split":
        group = cfg.loader.batch_size // m.bn_splits
        side = max(1, cfg.data.image_size // (8 if m.small_stem else 32))  # the last stage's feature map
        if group * side * side < MIN_BN_VALUES:
            return [f"model.bn_splits = {m.bn_splits} leaves {group} image(s) per group of loader.batch_size = "
                    f"{cfg.loader.batch_size}: the last batch norm sees {group * side * side} value(s) per channel "
                    f"at {cfg.data.image_size}x{cfg.data.image_size}, too few for batch statistics (use fewer "
                    f"splits or a larger batch)"]
    if world == 1 and mode in ("shuffle", "shuffle_gather"):
        return [f"model.key_bn = {mode} does nothing on one process (there are no other ranks to shuffle the keys "
                f"across); model.key_bn = split (or auto) is the single-device equivalent"]
    return []


class Trainer(ResumableRun):
    name = "fastft"

    def __init__(self, cfg: Config, loader=None):
        """`loader`: batches to train on in place of the config's pretrain_loader (fastft-bench passes synthetic
        ones already on the device)."""
        self.cfg = cfg
        self.device = setup(pick_device(cfg.run.device)).device  # joins the torchrun group, binds LOCAL_RANK's GPU
        self.dtype = pick_precision(cfg.run.precision, self.device)
        set_threads(cfg.run.threads)
        for warning in check_key_bn(cfg, world_size()):  # before anything is read or written
            self.say(f"fastft: warning: {warning}")
        super().__init__(cfg.run.out_dir, cfg.optim.epochs, cfg.run, cfg.run.resume)
        seed_everything(cfg.run.seed)  # the same initial model on every rank
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.loader = loader if loader is not None else pretrain_loader(cfg, self.device, rank(), world_size())
        self.steps_per_epoch = self.epoch_length(self.loader)
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = base_lr(cfg.optim, cfg.loader.batch_size * world_size())
        self.model = self.create_model()
        seed_everything(cfg.run.seed + rank())  # from here on each rank draws its own augmentations
        self.optimizer = self.create_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.scores = self.create_score_recorder()
        self.stats_bins = self.scores.neg_bins.as_tuple() if self.scores is not None else None
        self.knn_init: float | None = None
        self.knn_pixels: float | None = None
        self.knn_last: float | None = None
        self.resumed_epochs = cfg.optim.epochs  # optim.epochs of the checkpoint resumed from (it may be extended)
        self.epoch_seconds = 0.0  # wall time of the last epoch trained

    # -- construction -----------------------------------------------------------------------------------------
    def epoch_length(self, loader) -> int:
        steps = len(loader)
        if self.cfg.run.steps_per_epoch:
            steps = min(steps, self.cfg.run.steps_per_epoch)
        if steps == 0:
            raise ConfigError(f"loader.batch_size = {self.cfg.loader.batch_size} is larger than the "
                              f"{len(loader.dataset)} training images of {self.cfg.data.path!r}: an epoch would be "
                              f"empty")
        return steps

    def create_model(self) -> MoCo:
        cfg = self.cfg
        loss = select_loss(cfg.loss.kernel, self.device, loss_tf32(cfg.run.precision, cfg.loss.tf32))
        model = MoCo(cfg.model, cfg.ft, loss, queue_dtype(cfg.loss.queue_dtype),
                     ft_seed=cfg.run.seed, ft_stream=0 if cfg.ft.share_lambdas else rank())
        if cfg.model.key_bn == "sync":
            convert_sync_bn(model, self.device)
        model = model.to(self.device)
        if cfg.run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if world_size() > 1:
            broadcast_module(model)  # the key encoder and queue start identical too, not just encoder_q
            # Buffers are not broadcast each step: the queue stays identical through the all-gather of keys, and
            # query BN statistics stay per rank as in MoCo.
            model.use_ddp(torch.nn.parallel.DistributedDataParallel(
                model.encoder_q, device_ids=[self.device] if self.device.type == "cuda" else None,
                bucket_cap_mb=DDP_BUCKET_MB, **no_buffer_sync()))
        if cfg.run.compile:
            model.encoder_q.compile()
            model.encoder_k.compile()
        return model

    def create_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.SGD(self.model.encoder_q.parameters(), lr=self.peak_lr, momentum=o.momentum,
                               weight_decay=o.weight_decay, fused=self.device.type == "cuda" or None)

    def create_score_recorder(self) -> ScoreRecorder | None:
        """Pos/neg score statistics, on the device every step (fastft/score_stats.py)."""
        if not self.cfg.scores.enabled:
            return None
        return ScoreRecorder(self.cfg.scores, self.cfg.model.temperature, self.device,
                             ScoreStore(self.out_dir) if is_main() else None, self.log,
                             flush_every=chunk_steps(self.cfg.scores, self.steps_per_epoch),
                             transformed=(self.cfg.ft.pos != "none", self.cfg.ft.neg != "none"))

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "knn_init": self.knn_init, "knn_pixels": self.knn_pixels}

    def restore(self, ckpt: dict, path: Path) -> None:
        ckpt_io.check_compatible(ckpt["config"], self.cfg.to_dict(), path, defaults=Config().to_dict(),
                                 free_keys=ckpt_io.RESUME_FREE_KEYS | ckpt_io.RESUME_EXTENDABLE_KEYS)
        if ckpt["epoch"] > self.epochs:
            raise ckpt_io.CheckpointError(f"checkpoint {path} has trained {ckpt['epoch']} epochs, more than "
                                          f"optim.epochs = {self.epochs}: pass optim.epochs >= {ckpt['epoch']} to "
                                          f"continue it, or another run.out_dir")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.knn_init, self.knn_pixels = ckpt["knn_init"], ckpt["knn_pixels"]
        self.resumed_epochs = ckpt["config"]["optim"]["epochs"]

    def rng_extra(self) -> dict:
        return {"ft": self.model.ft.state()}

    def load_rng_extra(self, state: dict) -> None:
        self.model.ft.load_state(state["ft"])

    # -- the step ---------------------------------------------------------------------------------------------
    def set_lr(self) -> float:
        o = self.cfg.optim
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.peak_lr, o.schedule, o.lr_floor,
                   self.steps_per_epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def train_step(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.model(v1, v2, self.epoch, self.stats_bins)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scores is not None:
            self.scores.observe(out, self.model.queue)  # the queue this step's loss read
        self.model.enqueue(out.k)  # after backward, which may read the queue (fastft/loss.py)
        return out.loss.detach()

    def train_epoch(self, loader: Iterable | None = None, steps: int | None = None) -> float:
        """One epoch of `steps` steps (default: the config's loader and epoch length); the mean loss."""
        loader = self.loader if loader is None else loader
        steps = self.steps_per_epoch if steps is None else steps
        loader.set_epoch(self.epoch)
        self.model.train()
        losses = torch.zeros(steps, device=self.device)  # on device: no sync per step
        bar = self.progress(steps, f"epoch {self.epoch + 1}/{self.epochs}")
        t0, seen = time.perf_counter(), 0
        for i, (v1, v2, _) in enumerate(itertools.islice(loader, steps)):
            lr = self.set_lr()
            losses[i] = self.train_step(v1, v2)
            self.step += 1
            if self.scores is not None:
                self.scores.commit(self.step, self.epoch)
            seen += v1.shape[0]
            bar.update(1)
            if self.step % self.cfg.run.log_every == 0 or i + 1 == steps:
                loss = all_reduce_mean(losses[i]).item()
                rate = seen * world_size() / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
                self.log.log({"kind": "train", "step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
                              "images_per_s": rate})
        bar.close()
        if self.scores is not None:
            self.scores.flush()
        self.epoch += 1
        loss = mean_loss(losses)  # a sync: the epoch's work is done when it returns
        self.epoch_seconds = time.perf_counter() - t0
        return loss

    # -- the run ----------------------------------------------------------------------------------------------
    def knn(self, pixels: bool = False) -> float | None:
        """On rank 0 only (the others wait): the monitor needs no speed, and one copy of the memory bank."""
        top1 = evaluate_knn(self.model, self.cfg, self.device, self.dtype, pixels).top1 if is_main() else None
        barrier()
        return top1

    def end_epoch(self, loss: float) -> dict:
        # epoch_seconds: the epoch's training wall time (a timing, not state: kNN evaluations excluded), from
        # which learning curves against pretraining minutes are drawn (scripts/learning_curves.py).
        record = {"kind": "epoch", "step": self.step, "epoch": self.epoch, "loss": loss,
                  "epoch_seconds": round(self.epoch_seconds, 3), **bad_images_record(self.loader)}
        every = self.cfg.knn.every
        if every > 0 and (self.epoch % every == 0 or self.epoch == self.epochs):
            self.knn_last = record["knn_top1"] = self.knn()
        self.say(f"epoch {self.epoch}/{self.epochs}  loss {loss:.4f}"
                 + (f"  kNN top-1 {record['knn_top1']:.4f}" if record.get("knn_top1") is not None else ""))
        return record

    def prepare(self) -> None:
        """The run folder with this config, and score files cut back to the step training continues from."""
        if is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.out_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        if self.scores is not None:
            self.scores.begin(self.step, self.cfg.model.queue_size)

    def run(self) -> dict:
        cfg = self.cfg
        resumed = self.resume()
        if resumed and self.epoch >= self.epochs:  # finished before: its report, in one line
            summary = self.summary()
            self.write_summary(SUMMARY, summary)
            self.say(f"fastft: {self.out_dir} finished before ({self.epoch}/{self.epochs} epochs)"
                     + (f"; {knn_report(summary, self.cfg)}" if summary["knn_top1"] is not None else "")
                     + f"; see {self.out_dir / SUMMARY}")
            return summary
        if resumed:
            before = self.resumed_epochs
            self.say(f"fastft: resumed from {resumed} (epoch {self.epoch}, step {self.step})"
                     + (f"; optim.epochs {before} -> {self.epochs}: the lr follows the schedule of the new length"
                        if before != self.epochs else ""))
        self.prepare()
        if self.step == 0 and cfg.knn.every > 0 and (cfg.knn.random_init or cfg.knn.pixels):
            if cfg.knn.random_init:
                self.knn_init = self.knn()
            if cfg.knn.pixels:
                self.knn_pixels = self.knn(pixels=True)
            # Named for what was measured: at step 0 the encoder is at random initialisation.
            self.log.log({"kind": "knn", "step": 0, "epoch": 0, "random_init_top1": self.knn_init,
                          "pixels_top1": self.knn_pixels})
        self.say(f"fastft: {cfg.model.arch} MoCo ({cfg.model.head} head, T {cfg.model.temperature}) "
                 f"FT pos={cfg.ft.pos} neg={cfg.ft.neg} | {len(self.loader.dataset)} images, "
                 f"{self.steps_per_epoch} steps/epoch, batch {cfg.loader.batch_size}x{world_size()}, "
                 f"{self.device} {str(self.dtype).removeprefix('torch.')}")
        self.fit()
        summary = self.summary()
        if self.epoch == self.epochs:
            self.write_summary(SUMMARY, summary)
            if summary["knn_top1"] is not None:
                self.say(knn_report(summary, self.cfg))
        self.log.close()
        return summary

    def summary(self) -> dict:
        """The run's report, rebuilt from its state and metrics.jsonl on every start: a kill between the last
        checkpoint and summary.json loses nothing."""
        knn_last = self.knn_last
        if knn_last is None:  # not measured by this process: the record of the epoch the checkpoint holds
            logged = [r.get("knn_top1") for r in read_metrics(self.out_dir)
                      if r.get("kind") == "epoch" and r.get("epoch") == self.epoch]
            knn_last = logged[-1] if logged else None
        return {"epoch": self.epoch, "step": self.step, "loss_history": self.history, "knn_top1": knn_last,
                "knn_init_top1": self.knn_init, "knn_pixels_top1": self.knn_pixels}


def train(cfg: Config) -> dict:
    return Trainer(cfg).run()
