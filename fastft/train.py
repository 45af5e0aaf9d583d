"""Pretraining entry point: `python -m fastft.train CONFIG [key.sub=value ...]` (also under torchrun).

Wires the loader, the MoCo model, the loss kernel, logging and checkpoints together. Only fastft-bench imports
it, to time exactly this training loop (Trainer, with synthetic batches passed as `loader`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from fastft.pipelines.loader import pretrain_loader

from . import checkpoint as ckpt_io
from .config import Config, ConfigError, load_config
from .device import pick_device, pick_precision
from .distributed import (all_gather_objects, all_reduce_mean, barrier, broadcast_module, broadcast_object, cleanup,
                          is_main, rank, setup, world_size)
from .knn import evaluate_knn
from .loss import queue_dtype, select_loss
from .metrics import MetricsLog
from .moco import MoCo
from .schedule import base_lr, lr_at
from .score_stats import ScoreRecorder, ScoreStore
from .sync_bn import convert_sync_bn


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fastft.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config file (see configs/)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.epochs=10 run.out_dir=runs/x")
    return ap.parse_args(argv)


class Trainer:
    def __init__(self, cfg: Config, loader=None):
        """`loader`: the batches to train on in place of the config's pretrain_loader (fastft-bench passes
        synthetic ones already on the device; anything with set_epoch, len, dataset and (v1, v2, labels) batches)."""
        self.cfg = cfg
        self.device = setup(pick_device(cfg.run.device)).device  # joins the torchrun group, binds LOCAL_RANK's GPU
        self.dtype = pick_precision(cfg.run.precision, self.device)
        self.out_dir = Path(cfg.run.out_dir)
        seed_everything(cfg.run.seed)  # the same initial model on every rank
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.loader = loader if loader is not None else pretrain_loader(cfg, self.device, rank(), world_size())
        self.steps_per_epoch = len(self.loader)
        if cfg.run.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.run.steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"loader.batch_size = {cfg.loader.batch_size} is larger than the "
                              f"{len(self.loader.dataset)} training images of {cfg.data.path!r}: an epoch would be empty")
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = base_lr(cfg.optim, cfg.loader.batch_size * world_size())

        self.model = MoCo(cfg.model, cfg.ft, select_loss(cfg.loss.kernel, self.device),
                          queue_dtype(cfg.loss.queue_dtype), ft_seed=cfg.run.seed,
                          ft_stream=0 if cfg.ft.share_lambdas else rank())
        if cfg.model.key_bn == "sync":
            convert_sync_bn(self.model, self.device)
        self.model = self.model.to(self.device)
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        seed_everything(cfg.run.seed + rank())  # from here on each rank draws its own augmentations
        if world_size() > 1:
            broadcast_module(self.model)  # the key encoder and queue start identical too, not just encoder_q
            # Buffers are not broadcast each step: the queue stays identical through the all-gather of keys, and
            # query BN statistics stay per rank as in MoCo.
            self.model.use_ddp(torch.nn.parallel.DistributedDataParallel(
                self.model.encoder_q, device_ids=[self.device] if self.device.type == "cuda" else None,
                broadcast_buffers=False))
        self.net = self.model
        self.optimizer = torch.optim.SGD(self.model.encoder_q.parameters(), lr=self.peak_lr,
                                         momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                                         fused=self.device.type == "cuda" or None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        if cfg.run.compile:
            self.model.encoder_q.compile()
            self.model.encoder_k.compile()

        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.knn_init: float | None = None
        self.knn_pixels: float | None = None
        self.history: list[float] = []  # mean loss of each completed epoch
        self.log = MetricsLog(self.out_dir, enabled=is_main(), tensorboard=cfg.run.tensorboard)
        self.scores: ScoreRecorder | None = None
        if cfg.scores.enabled:  # pos/neg score statistics, on the device every step (fastft/score_stats.py)
            self.scores = ScoreRecorder(cfg.scores, cfg.model.temperature, self.device,
                                        ScoreStore(self.out_dir) if is_main() else None, self.log)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def rng_snapshot(self) -> dict:
        return {**ckpt_io.rng_state(), "ft": self.model.ft.state()}

    def state(self, rngs: list[dict]) -> dict:
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "config": self.cfg.to_dict(),
            "epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": rngs, "world_size": world_size(), "history": self.history,
            "knn_init": self.knn_init, "knn_pixels": self.knn_pixels,
        }

    def restore(self, ckpt: dict, path: Path) -> None:
        ckpt_io.check_compatible(ckpt["config"], self.cfg.to_dict(), path, defaults=Config().to_dict())
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if len(ckpt["rng"]) == world_size():  # each rank continues its own random streams
            ckpt_io.set_rng_state(ckpt["rng"][rank()])
            self.model.ft.load_state(ckpt["rng"][rank()]["ft"])
        else:
            self.say(f"warning: {path} was written by {len(ckpt['rng'])} process(es), this run has {world_size()}: "
                     f"random streams restart, so the run continues but not bit for bit")
        self.epoch, self.step, self.history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
        self.knn_init, self.knn_pixels = ckpt["knn_init"], ckpt["knn_pixels"]
        self.log.truncate_after(self.step)

    def maybe_resume(self) -> None:
        mode = self.cfg.run.resume
        if mode == "none":
            return
        if mode == "auto":  # rank 0 picks, so that every rank resumes from the same checkpoint
            found = ckpt_io.newest_good(self.out_dir) if is_main() else None
            chosen = broadcast_object(str(found[0]) if found else None)
            if chosen is None:
                return
            path = Path(chosen)
            ckpt = found[1] if found else ckpt_io.load(path)
        else:
            path = Path(mode)
            ckpt = ckpt_io.load(path)
        self.restore(ckpt, path)
        self.say(f"resumed from {path} (epoch {self.epoch}, step {self.step})")

    def save(self) -> None:
        rngs = all_gather_objects(self.rng_snapshot())  # every rank's streams; rank 0 writes
        if is_main():
            ckpt_io.save_atomic(self.state(rngs), ckpt_io.checkpoint_path(self.out_dir, self.epoch))
            ckpt_io.prune(self.out_dir, self.cfg.run.keep_ckpts)
        barrier()

    # -- loop -------------------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if is_main():
            tqdm.write(msg)

    def set_lr(self) -> float:
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.peak_lr, self.cfg.optim.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def train_step(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss, _, _ = self.net(v1, v2, self.epoch, scores=self.scores)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def train_epoch(self) -> float:
        self.loader.set_epoch(self.epoch)
        self.model.train()
        losses = torch.zeros(self.steps_per_epoch, device=self.device)  # on device: no sync per step
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.cfg.optim.epochs}",
                   disable=not (self.cfg.run.progress and is_main()), dynamic_ncols=True, leave=False)
        t0, seen = time.perf_counter(), 0
        for i, (v1, v2, _) in enumerate(itertools.islice(self.loader, self.steps_per_epoch)):
            lr = self.set_lr()
            losses[i] = self.train_step(v1, v2)
            self.step += 1
            if self.scores is not None:
                self.scores.commit(self.step, self.epoch)
            seen += v1.shape[0]
            bar.update(1)
            if self.step % self.cfg.run.log_every == 0 or i + 1 == self.steps_per_epoch:
                loss = all_reduce_mean(losses[i]).item()
                rate = seen * world_size() / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
                self.log.log({"kind": "train", "step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
                              "images_per_s": rate})
        bar.close()
        if self.scores is not None:
            self.scores.flush()
        self.epoch += 1
        return all_reduce_mean(losses.mean()).item()

    def knn(self, pixels: bool = False) -> float | None:
        """On rank 0 only (the others wait): the monitor needs no speed, and one copy of the memory bank."""
        top1 = evaluate_knn(self.model, self.cfg, self.device, self.dtype, pixels).top1 if is_main() else None
        barrier()
        return top1

    def run(self) -> dict:
        cfg = self.cfg
        self.maybe_resume()
        if is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if self.scores is not None:
            self.scores.begin(self.step, cfg.model.queue_size)  # drops score chunks past a resumed checkpoint
        if self.step == 0 and cfg.knn.every > 0:
            self.knn_init = self.knn()
            if cfg.knn.pixels:
                self.knn_pixels = self.knn(pixels=True)
            self.log.log({"kind": "knn", "step": 0, "epoch": 0, "top1": self.knn_init, "pixels_top1": self.knn_pixels})
        self.say(f"fastft: {cfg.model.arch} MoCo ({cfg.model.head} head, T {cfg.model.temperature}) "
                 f"FT pos={cfg.ft.pos} neg={cfg.ft.neg} | {len(self.loader.dataset)} images, "
                 f"{self.steps_per_epoch} steps/epoch, batch {cfg.loader.batch_size}x{world_size()}, "
                 f"{self.device} {str(self.dtype).removeprefix('torch.')}")
        knn_last = None
        ran = 0
        while self.epoch < cfg.optim.epochs:
            if cfg.run.epochs_per_job and ran >= cfg.run.epochs_per_job:
                self.say(f"stopping after {ran} epoch(s) as run.epochs_per_job asks; run again to resume")
                break
            mean_loss = self.train_epoch()
            ran += 1
            self.history.append(mean_loss)
            record = {"kind": "epoch", "step": self.step, "epoch": self.epoch, "loss": mean_loss}
            last = self.epoch == cfg.optim.epochs
            if cfg.knn.every > 0 and (self.epoch % cfg.knn.every == 0 or last):
                knn_last = self.knn()
                record["knn_top1"] = knn_last
            self.log.log(record)
            self.say(f"epoch {self.epoch}/{cfg.optim.epochs}  loss {mean_loss:.4f}"
                     + (f"  kNN top-1 {knn_last:.4f}" if knn_last is not None and "knn_top1" in record else ""))
            if self.epoch % cfg.run.ckpt_every == 0 or last:
                self.save()
        summary = {"epoch": self.epoch, "step": self.step, "loss_history": self.history,
                   "knn_top1": knn_last, "knn_init_top1": self.knn_init, "knn_pixels_top1": self.knn_pixels}
        done = self.out_dir / "summary.json"
        if ran == 0 and done.is_file():  # a finished run started again: its report stands (no kNN was run now)
            summary = json.loads(done.read_text())
        if self.epoch == cfg.optim.epochs and is_main():
            self.report(summary)
        self.log.close()
        return summary

    def report(self, summary: dict) -> None:
        tmp = self.out_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.out_dir / "summary.json")
        if summary["knn_top1"] is None:
            return
        parts = [f"trained {summary['knn_top1']:.4f}", f"random init {summary['knn_init_top1']:.4f}"]
        if summary["knn_pixels_top1"] is not None:
            parts.append(f"raw pixels {summary['knn_pixels_top1']:.4f}")
        self.say(f"kNN top-1 on {self.cfg.data.val_split} (k {self.cfg.knn.k}, T {self.cfg.knn.temperature}): "
                 + " | ".join(parts))


def train(cfg: Config) -> dict:
    return Trainer(cfg).run()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except (ConfigError, ckpt_io.CheckpointError, FileNotFoundError) as e:
        print(f"fastft.train: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
