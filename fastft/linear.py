"""Linear evaluation: `fastft-linear CONFIG [--pretrained CKPT | --random-init] [key.sub=value ...]`.

The MoCo protocol on standardised features: the query backbone is frozen (eval-mode
BatchNorm, no gradient), its features pass a BatchNorm without affine parameters, and one linear layer is trained
with SGD (`linear.*`; defaults lr 0.1 with a cosine schedule, momentum 0.9, wd 0, batch 256, 100 epochs) on
RandomResizedCrop + flip views of the train split; top-1 / top-5 are measured on the val split (Resize /
CenterCrop), and the final training loss is reported with a warning when it stays near chance. Without
--pretrained the newest checkpoint in run.out_dir is probed. --compare-random-init also probes the same
architecture at random initialisation and, on cached features, cross-checks both with an L-BFGS logistic
regression.

The probe lives in <linear.out_dir, default run.out_dir/linear>/<encoder> (its checkpoints, resumed like
pretraining, and its own metrics.jsonl); the final result is appended to the run's metrics.jsonl as a "linear"
record at the encoder's pretraining step.

Under `torchrun --nproc_per_node N -m fastft.linear ...` every rank trains on its interleaved shard of
linear.batch_size images per step, DDP averages the head's gradients (so N ranks take the steps one process
with N times the batch would), and rank 0 logs and checkpoints; every rank measures the whole val split.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt_io
from . import cli
from .config import Config, ConfigError, LinearConfig, load_config
from .data import eval_loader, linear_loader
from .device import pick_device, pick_precision, set_threads
from .distributed import is_main, rank, setup, world_size
from .knn import knn_report
from .metrics import MetricsLog, read_metrics
from .pretrained import Backbone, BackboneInfo, pick_backbone, random_backbone
from .resumable import ResumableRun, bad_images_record, mean_loss
from .sync_bn import convert_sync_bn
from .trainer import SUMMARY

RESULT = "result.json"  # the finished probe's numbers, in its folder
PROBE_KIND = "linear-probe"  # marks probe checkpoints: they hold a classifier, not an encoder
# linear.* keys that change where output goes or how often val is measured, not the trained classifier.
_PROBE_FREE_KEYS = {"resume", "eval_every", "out_dir"}
_RESUME_HINT = ("Probe the same encoder with the same linear.* settings, set another linear.out_dir, or "
                "linear.resume=none to start afresh.")

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ProbeResult:
    top1: float
    top5: float
    n_val: int
    train_loss: float | None = None  # mean training loss of the last epoch (probes before 0.2 did not keep it)


def lr_at_epoch(cfg: LinearConfig, epoch: int) -> float:
    """The lr of `epoch` (counted from 0): cosine from lr to 0 over the epochs, or MoCo's steps (lr times lr_decay
    for every milestone reached)."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)


def build_head(width: int, classes: int, standardize: bool) -> nn.Module:
    """The probe: [BatchNorm without affine parameters, then] one linear layer, MoCo's init (N(0, 0.01), bias 0)."""
    linear = nn.Linear(width, classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    if not standardize:
        return linear
    return nn.Sequential(nn.BatchNorm1d(width, affine=False), linear)


def converged(train_loss: float, classes: int) -> bool:
    """Whether the final training loss is well below chance (ln C, what predicting the class frequencies gives)."""
    return train_loss < 0.5 * math.log(classes)


def logistic_regression(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                        l2: float = 1e-3, max_iter: int = 500) -> tuple[float, float]:
    """The cross-check of the SGD probe: multinomial logistic regression on standardised features, fitted to
    convergence by full-batch L-BFGS (no lr, no schedule). Returns (val top-1, final training loss)."""
    (x, y), (xv, yv) = train, val
    x, xv = x.double(), xv.double()
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xv = (x - mean) / std, (xv - mean) / std
    classes = int(max(y.max(), yv.max())) + 1
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xv @ w + b).argmax(1).eq(yv).double().mean().item(), F.cross_entropy(x @ w + b, y).item()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many rows have their label among the k best scores, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :k].any(dim=1).sum()) for k in ks]


def probe_identity(cfg: Config, info: BackboneInfo) -> dict:
    """Everything the probe's numbers depend on: a probe checkpoint resumes only under the same identity."""
    return {
        "encoder": {"kind": info.kind, "arch": info.arch, "small_stem": info.small_stem,
                    "fingerprint": info.fingerprint},
        "linear": {k: v for k, v in asdict(cfg.linear).items() if k not in _PROBE_FREE_KEYS},
        "data": {k: v for k, v in asdict(cfg.data).items() if k != "cache_dir"},
        "loader": {"eval_crop_ratio": cfg.loader.eval_crop_ratio},
        "run": {"seed": cfg.run.seed, "precision": cfg.run.precision, "steps_per_epoch": cfg.run.steps_per_epoch},
    }


class FrozenEncoder:
    """The backbone as a fixed feature extractor: eval-mode BN, no gradient, fp32 features out."""

    def __init__(self, backbone: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool):
        self.module = backbone.to(device).eval().requires_grad_(False)
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.module(images).float().flatten(1)

    def features(self, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = zip(*((self(x), y) for x, y in batches))
        return torch.cat(feats), torch.cat(labels)


class AugmentedFeatures:
    """Features of freshly augmented train views every epoch: the protocol."""

    def __init__(self, cfg: Config, encoder: FrozenEncoder):
        self.loader = linear_loader(cfg, encoder.device, rank(), world_size())
        self.encoder = encoder
        self.classes = self.loader.dataset.classes

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Batches:
        self.loader.set_epoch(epoch)
        return ((self.encoder(x), y) for x, y in self.loader)


class CachedFeatures:
    """Features of the un-augmented train split, extracted once and reshuffled every epoch (linear.cache_features)."""

    def __init__(self, cfg: Config, encoder: FrozenEncoder):
        self.loader = eval_loader(cfg, cfg.data.train_split, encoder.device)
        self.encoder = encoder
        self.classes = self.loader.dataset.classes
        self.batch_size, self.seed = cfg.linear.per_process_batch(world_size()), cfg.run.seed
        self.n = len(self.loader.dataset)
        self.per_rank = self.n // world_size()  # equal shards, so every rank takes as many steps
        # Extracted on first use, so re-running a finished probe (which only reports) costs no extraction.
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return -(-self.per_rank // self.batch_size)

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is None:
            self.cache = self.encoder.features(self.loader)
        return self.cache

    def epoch(self, epoch: int) -> Batches:
        feats, labels = self.features()
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # order depends on (seed, epoch) only
        # Interleaved shards (as DistributedSampler's): step i of W ranks covers exactly the images of step i of
        # one process with W times the batch, so the averaged gradient is that process's gradient.
        perm = torch.randperm(self.n, generator=g)[:self.per_rank * world_size()][rank()::world_size()]
        perm = perm.to(feats.device)
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield feats[idx], labels[idx]


class LinearProbe(ResumableRun):
    name = "linear probe"

    def __init__(self, cfg: Config, backbone: Backbone):
        self.cfg, self.lin, self.info = cfg, cfg.linear, backbone.info
        self.device = setup(pick_device(cfg.run.device)).device  # joins the torchrun group, binds LOCAL_RANK's GPU
        dtype = pick_precision(cfg.run.precision, self.device)
        set_threads(cfg.run.threads)
        self.run_dir = Path(cfg.run.out_dir)
        # One folder per encoder (epoch_0020, random_init): probes of several checkpoints never collide.
        super().__init__((Path(self.lin.out_dir) if self.lin.out_dir else self.run_dir / "linear") / self.info.name,
                         self.lin.epochs, cfg.run, self.lin.resume, "linear.resume")
        self.encoder = FrozenEncoder(backbone.module, self.device, dtype, cfg.run.channels_last)
        self.identity = probe_identity(cfg, self.info)
        torch.manual_seed(cfg.run.seed + rank())  # the classifier's init and the augmentations of worker-less loading

        self.train_data: CachedFeatures | AugmentedFeatures = (
            CachedFeatures(cfg, self.encoder) if self.lin.cache_features else AugmentedFeatures(cfg, self.encoder))
        self.val = eval_loader(cfg, cfg.data.val_split, self.device)
        if self.val.dataset.classes != self.train_data.classes:
            raise ConfigError(f"data.path {cfg.data.path!r}: the {cfg.data.val_split!r} split has other classes "
                              f"than {cfg.data.train_split!r} ({len(self.val.dataset.classes)} vs "
                              f"{len(self.train_data.classes)} folders): labels would not line up")
        self.val_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # val features, with cache_features
        self.batch = self.lin.per_process_batch(world_size())
        self.steps_per_epoch = len(self.train_data)
        if cfg.run.steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.run.steps_per_epoch)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the linear probe's batch of {self.batch} per process "
                              f"(linear.batch_size / linear.global_batch) is larger than the training images of "
                              f"{cfg.data.path!r} per process: an epoch would be empty")

        self.head = build_head(backbone.width, len(self.train_data.classes), self.lin.standardize)
        if world_size() > 1:  # the standardisation's statistics are those of the global batch
            self.head = convert_sync_bn(self.head, self.device)
        self.head = self.head.to(self.device)
        # Under torchrun DDP averages the head's gradients, and its first broadcast makes every rank start from
        # rank 0's init; `self.head` stays the plain module that checkpoints hold.
        self.train_head = self.head if world_size() == 1 else nn.parallel.DistributedDataParallel(
            self.head, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=self.lin.lr, momentum=self.lin.momentum,
                                         weight_decay=self.lin.weight_decay)
        self.result: ProbeResult | None = None  # set after the last epoch

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"kind": PROBE_KIND, "config": self.cfg.to_dict(), "identity": self.identity,
                "encoder": asdict(self.info), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "result": asdict(self.result) if self.result else None}

    def restore(self, ckpt: dict, path: Path) -> None:
        if ckpt.get("kind") != PROBE_KIND:
            raise ckpt_io.CheckpointError(f"{path} is not a linear-probe checkpoint (it has no 'kind: {PROBE_KIND}'"
                                          f" marker); linear.resume takes auto, none or a probe checkpoint")
        ckpt_io.check_compatible(ckpt["identity"], self.identity, path, free_keys=set(), free_sections=set(),
                                 hint=_RESUME_HINT)
        self.head.load_state_dict(ckpt["head"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.result = ProbeResult(**ckpt["result"]) if ckpt["result"] else None

    # -- train / evaluate -------------------------------------------------------------------------------------
    def train_epoch(self) -> float:
        self.lr = lr_at_epoch(self.lin, self.epoch)
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr
        self.head.train()
        losses = torch.zeros(self.steps_per_epoch, device=self.device)  # on device: no sync per step
        bar = self.progress(self.steps_per_epoch, f"linear {self.epoch + 1}/{self.epochs}")
        for i, (feats, labels) in enumerate(itertools.islice(self.train_data.epoch(self.epoch), self.steps_per_epoch)):
            loss = F.cross_entropy(self.train_head(feats), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses[i] = loss.detach()
            self.step += 1
            bar.update(1)
            if self.step % self.cfg.run.log_every == 0:
                bar.set_postfix(loss=f"{losses[i].item():.4f}", lr=f"{self.lr:.4g}")
        bar.close()
        self.epoch += 1
        return mean_loss(losses)  # over every rank's shard, as one process would log

    @torch.no_grad()
    def evaluate(self) -> ProbeResult:
        self.head.eval()
        if self.lin.cache_features and self.val_cache is None:
            self.val_cache = self.encoder.features(self.val)
        if self.val_cache is not None:
            batches: Batches = zip(self.val_cache[0].split(1024), self.val_cache[1].split(1024))
        else:
            batches = ((self.encoder(x), y) for x, y in self.val)
        correct, n = [0, 0], 0
        for feats, y in batches:
            correct = [a + b for a, b in zip(correct, topk_correct(self.head(feats), y))]
            n += len(y)
        return ProbeResult(correct[0] / n, correct[1] / n, n)

    def end_epoch(self, loss: float) -> dict:
        record = {"kind": "linear_epoch", "step": self.step, "epoch": self.epoch, "loss": loss, "lr": self.lr,
                  **bad_images_record(self.train_data.loader)}
        last = self.epoch == self.epochs
        if last or (self.lin.eval_every and self.epoch % self.lin.eval_every == 0):
            res = self.evaluate()
            record.update(top1=res.top1, top5=res.top5)
            if last:
                self.result = dataclasses.replace(res, train_loss=loss)
            # a line per measurement; the progress bar shows the epochs between
            self.say(f"linear epoch {self.epoch}/{self.epochs}  loss {loss:.4f}  lr {self.lr:.4g}  "
                     f"top-1 {res.top1:.4f}  top-5 {res.top5:.4f}")
        elif not self.live_progress():  # no bar (a log file): one line per epoch
            self.say(f"linear epoch {self.epoch}/{self.epochs}  loss {loss:.4f}  lr {self.lr:.4g}")
        return record

    def run(self) -> ProbeResult | None:
        """Train to linear.epochs (or run.epochs_per_job more) and return the final val result (None if stopped)."""
        resumed = self.resume()
        if self.result is not None and self.epoch >= self.epochs:  # finished before: report it, in one line
            self.report(self.result, again=True)
            return self.result
        if resumed:
            self.say(f"linear probe: resumed from {resumed} (epoch {self.epoch}, step {self.step})")
        features = "cached (no augmentation)" if self.lin.cache_features else "augmented"
        schedule = (f"cosine from lr {self.lin.lr}" if self.lin.schedule == "cosine" else
                    f"lr {self.lin.lr} x{self.lin.lr_decay} at {self.lin.milestones}")
        self.say(f"linear probe: {self.info.describe()} | {len(self.train_data.classes)} classes, "
                 f"{self.steps_per_epoch} steps/epoch, batch {self.batch}x{world_size()}, {features} "
                 f"features{', standardised' if self.lin.standardize else ''}, {schedule} | {self.out_dir}")
        self.fit()
        if self.result is not None:
            self.report(self.result)
        self.log.close()
        return self.result

    def cached_features(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """(train, val) features of the un-augmented images, each (features, labels): what the probe trained on
        with linear.cache_features, extracted now if it did not."""
        train = self.train_data.features() if isinstance(self.train_data, CachedFeatures) else \
            self.encoder.features(eval_loader(self.cfg, self.cfg.data.train_split, self.device))
        if self.val_cache is None:
            self.val_cache = self.encoder.features(self.val)
        return train, self.val_cache

    def report(self, res: ProbeResult, again: bool = False) -> None:
        record = {"kind": "linear", "step": self.info.step, "epoch": self.info.epoch, "top1": res.top1,
                  "top5": res.top5, "n_val": res.n_val, "train_loss": res.train_loss, "encoder": self.info.kind,
                  "checkpoint": self.info.checkpoint, "fingerprint": self.info.fingerprint,
                  "probe_dir": str(self.out_dir), "probe_epochs": self.lin.epochs,
                  "cache_features": self.lin.cache_features}
        self.write_summary(RESULT, record)
        if not is_main():
            return
        # Once per finished probe, however often it is re-run: the run's metrics are a record, not a log of calls.
        same = lambda r: r.get("kind") == "linear" and all(r.get(k) == record[k] for k in
                                                          ("probe_dir", "fingerprint", "probe_epochs"))
        if not any(same(r) for r in read_metrics(self.run_dir)):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_log = MetricsLog(self.run_dir, tensorboard=self.cfg.run.tensorboard)
            run_log.log(record, tb_prefix=f"linear_{self.info.kind}")  # one tag per encoder kind
            run_log.close()
        loss = "" if res.train_loss is None else f", final training loss {res.train_loss:.4f}"
        self.say(f"linear probe{' (finished before)' if again else ''} top-1 {res.top1:.4f}  top-5 {res.top5:.4f} "
                 f"on {self.cfg.data.val_split} ({res.n_val} images){loss} | {self.info.describe()}")
        classes = len(self.train_data.classes)
        if res.train_loss is not None and not converged(res.train_loss, classes):
            self.say(f"linear probe: warning: the probe did not converge (final training loss {res.train_loss:.4f}, "
                     f"chance is ln {classes} = {math.log(classes):.4f}): its accuracy understates the encoder. Try "
                     f"linear.standardize=true, a lower linear.lr or more linear.epochs")


def probe(cfg: Config, backbone: Backbone) -> ProbeResult | None:
    return LinearProbe(cfg, backbone).run()


def knn_line(cfg: Config, info: BackboneInfo) -> str | None:
    """The pretraining run's own kNN report, when it describes the probed checkpoint."""
    path = Path(cfg.run.out_dir) / SUMMARY
    if not path.is_file():
        return None
    s = json.loads(path.read_text())
    if s.get("knn_top1") is None or s.get("epoch") != info.epoch:
        return None
    return knn_report(s, cfg)


def compare_with_random_init(cfg: Config, info: BackboneInfo, trained: LinearProbe) -> None:
    """The same probe on the same architecture at random initialisation, printed beside the trained encoder's,
    with the logistic-regression cross-check on the same cached features (linear.cache_features)."""
    base = LinearProbe(cfg, random_backbone(cfg.model, cfg.run.seed))
    if base.run() is None or not is_main():
        return
    what = f"{cfg.linear.epochs} epochs, {'cached' if cfg.linear.cache_features else 'augmented'} features"
    a, b = trained.result, base.result
    loss = lambda r: "" if r.train_loss is None else f" (training loss {r.train_loss:.3f})"
    print(f"linear probe top-1 on {cfg.data.val_split} ({what}): trained {a.top1:.4f}{loss(a)} | "
          f"random init {b.top1:.4f}{loss(b)}")
    if cfg.linear.cache_features:
        (ta, _), (tb, _) = (logistic_regression(*p.cached_features()) for p in (trained, base))
        print(f"cross-check, L-BFGS logistic regression on the same cached features: trained {ta:.4f} | "
              f"random init {tb:.4f} (gap {100 * (ta - tb):+.1f} points; the probe's: {100 * (a.top1 - b.top1):+.1f})")
        # The floor beside both: the same linear fit on the pixels themselves (as kNN's pixel baseline sees them).
        pixels = FrozenEncoder(nn.Flatten(), trained.device, torch.float32, channels_last=False)
        tp, _ = logistic_regression(*(pixels.features(eval_loader(cfg, split, trained.device))
                                      for split in (cfg.data.train_split, cfg.data.val_split)))
        print(f"linear on the raw pixels (eval transform), the same L-BFGS logistic regression: {tp:.4f} "
              f"(trained {100 * (ta - tp):+.1f} points)")
    line = knn_line(cfg, info)
    if line:
        print(line)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap, _ = cli.encoder_parser("fastft-linear", __doc__, "key.sub=value overrides, e.g. linear.epochs=10")
    ap.add_argument("--compare-random-init", action="store_true",
                    help="also run the same probe on a random-init encoder and print both (and the run's kNN)")
    return ap.parse_intermixed_args(argv)  # options may come before, between or after the overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        if args.compare_random_init and args.random_init:
            raise ConfigError("--compare-random-init compares a pretrained encoder with random init; "
                              "drop --random-init")
        backbone = pick_backbone(cfg, args.pretrained, args.random_init)
        trained = LinearProbe(cfg, backbone)
        if trained.run() is not None and args.compare_random_init:
            compare_with_random_init(cfg, backbone.info, trained)

    return cli.run("fastft-linear", body)


if __name__ == "__main__":
    sys.exit(main())
