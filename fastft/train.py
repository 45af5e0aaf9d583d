"""Pretraining entry point: `python -m fastft.train CONFIG [key.sub=value ...]` (also under torchrun).

Wires the loader, the MoCo model, the loss kernel, logging and checkpoints together; nothing imports it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from fastft.pipelines.loader import eval_loader, pretrain_loader

from . import checkpoint as ckpt_io
from .config import Config, ConfigError, load_config
from .distributed import is_main, launched_world_size, rank, world_size
from .knn import extract_features, knn_top1
from .loss import select_loss
from .metrics import MetricsLog
from .moco import MoCo
from .schedule import base_lr, lr_at


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 is ~10x slower than fp32 on CPUs without bf16 instructions (measured, DESIGN.md section 4).
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class KnnResult:
    top1: float
    n_train: int
    n_val: int


def evaluate_knn(model: MoCo, cfg: Config, device: torch.device, dtype: torch.dtype,
                 pixels: bool = False) -> KnnResult:
    """Weighted kNN top-1 of the query backbone (or of raw pixels) on the val split, train split as memory."""
    was_training = model.training
    model.eval()
    backbone = model.encoder_q.backbone
    encode = (lambda x: x) if pixels else backbone
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        train_loader = eval_loader(cfg, cfg.data.train_split, device)
        tf, tl = extract_features(encode, train_loader)
        vf, vl = extract_features(encode, eval_loader(cfg, cfg.data.val_split, device))
    model.train(was_training)
    num_classes = len(train_loader.dataset.classes)
    return KnnResult(knn_top1(tf, tl, vf, vl, num_classes, cfg.knn.k, cfg.knn.temperature), len(tl), len(vl))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fastft.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config file (see configs/)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.epochs=10 run.out_dir=runs/x")
    return ap.parse_args(argv)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.device = pick_device(cfg.run.device)
        self.dtype = pick_precision(cfg.run.precision, self.device)
        self.out_dir = Path(cfg.run.out_dir)
        seed_everything(cfg.run.seed + rank())
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        self.loader = pretrain_loader(cfg, self.device, rank(), world_size())
        self.steps_per_epoch = len(self.loader)
        if cfg.run.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.run.steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"loader.batch_size = {cfg.loader.batch_size} is larger than the "
                              f"{len(self.loader.dataset)} training images of {cfg.data.path!r}: an epoch would be empty")
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.peak_lr = base_lr(cfg.optim, cfg.loader.batch_size * world_size())

        self.model = MoCo(cfg.model, cfg.ft, select_loss(cfg.loss.kernel, self.device)).to(self.device)
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
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

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "config": self.cfg.to_dict(),
            "epoch": self.epoch, "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "rng": ckpt_io.rng_state(), "history": self.history,
            "knn_init": self.knn_init, "knn_pixels": self.knn_pixels,
        }

    def restore(self, ckpt: dict, path: Path) -> None:
        ckpt_io.check_compatible(ckpt["config"], self.cfg.to_dict(), path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        ckpt_io.set_rng_state(ckpt["rng"])
        self.epoch, self.step, self.history = ckpt["epoch"], ckpt["step"], list(ckpt["history"])
        self.knn_init, self.knn_pixels = ckpt["knn_init"], ckpt["knn_pixels"]
        self.log.truncate_after(self.step)

    def maybe_resume(self) -> None:
        mode = self.cfg.run.resume
        if mode == "none":
            return
        if mode == "auto":
            found = ckpt_io.newest_good(self.out_dir)
            if found is None:
                return
            path, ckpt = found
        else:
            path = Path(mode)
            ckpt = ckpt_io.load(path)
        self.restore(ckpt, path)
        self.say(f"resumed from {path} (epoch {self.epoch}, step {self.step})")

    def save(self) -> None:
        if not is_main():
            return
        ckpt_io.save_atomic(self.state(), ckpt_io.checkpoint_path(self.out_dir, self.epoch))
        ckpt_io.prune(self.out_dir, self.cfg.run.keep_ckpts)

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
            loss, _, _ = self.model(v1, v2, self.epoch)
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
            seen += v1.shape[0]
            bar.update(1)
            if self.step % self.cfg.run.log_every == 0 or i + 1 == self.steps_per_epoch:
                loss = losses[i].item()
                rate = seen * world_size() / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
                self.log.log({"kind": "train", "step": self.step, "epoch": self.epoch, "loss": loss, "lr": lr,
                              "images_per_s": rate})
        bar.close()
        self.epoch += 1
        return losses.mean().item()

    def knn(self, pixels: bool = False) -> float:
        return evaluate_knn(self.model, self.cfg, self.device, self.dtype, pixels).top1

    def run(self) -> dict:
        cfg = self.cfg
        self.maybe_resume()
        if is_main():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
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
                     + (f"  kNN top-1 {knn_last:.4f}" if "knn_top1" in record else ""))
            if self.epoch % cfg.run.ckpt_every == 0 or last:
                self.save()
        summary = {"epoch": self.epoch, "step": self.step, "loss_history": self.history,
                   "knn_top1": knn_last, "knn_init_top1": self.knn_init, "knn_pixels_top1": self.knn_pixels}
        if self.epoch == cfg.optim.epochs and is_main():
            self.report(summary)
        self.log.close()
        return summary

    def report(self, summary: dict) -> None:
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
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
        if launched_world_size() > 1:
            raise ConfigError("launched with WORLD_SIZE > 1, but multi-process (DDP) training is not built yet; "
                              "run one process (torchrun --nproc_per_node=1)")
        train(cfg)
    except (ConfigError, ckpt_io.CheckpointError, FileNotFoundError) as e:
        print(f"fastft.train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
