"""Where the time goes: loader, training step and loss-kernel throughput, side by side, and the bottleneck.

    fastft-bench all    --config configs/demo.yaml --device cpu --json bench.json
    fastft-bench model  --config configs/in1k.yaml --device cuda loader.batch_size=256
    fastft-bench train  --config configs/in1k.yaml loader.batch_size=256 --synthetic-data 8192
    fastft-bench scores --config configs/demo.yaml --device cpu --threads 1
    fastft-bench ddp    --config configs/demo.yaml --world 4

Modes (an image is always two augmented views, through the query and the key encoder):
  loader  images/s of each installed loader backend on the config's data, alone (no model), each against MoCo's
          own DataLoader recipe (torchvision ImageFolder + its v2 transforms, PIL blur), always timed too.
  model   the Trainer's own training loop on one synthetic batch already on the device: the upper bound of
          training throughput (no data cost).
  step    model again, with a clock at each phase of the step (query forward, momentum update + key forward,
          FT + loss forward, zero_grad + backward, optimizer, then score statistics + enqueue + logging): ms
          per phase. On a GPU the clock synchronises the device at every phase boundary, so its total runs a
          little above `model`.
  train   the Trainer's loop through the config's real loader, side by side with `model`: end-to-end images/s
          and the fraction of step time spent waiting for the next batch.
  kernel  forward + backward of the logits/loss kernel (Triton, where it runs) against the torch reference at
          the config's N (batch), K (queue), C (dim), without score statistics.
  all     every mode above, then the verdict.
  scores  what score logging costs: training steps on --batches real batches held in memory with logging off,
          on, and on + untransformed, and the logging calls (observe + commit, flush) alone.
  ddp     what a step sends between ranks: --world gloo processes on the CPU run the real step under each
          model.key_bn; every collective's bytes (received per rank, from the tensors handed to it) and time,
          per step, then the scaling model at 8, 64 and 256 GPUs.
Comparisons within one invocation run interleaved (A B A B ...), each candidate once untimed first; medians of
--repeats are reported. Each timed run is --warmup untimed steps (or batches) then --steps timed ones; runs
through a real loader (loader, train) round both up to whole waves of loader.workers, since each DataLoader
worker builds whole batches (the first wave comes out of the prefetch buffer at once).

Verdict: `data` when end to end runs below 90% of model-only (or, without `train`, when the loader alone is
slower than the model); otherwise `kernel` when the loss kernel's forward + backward takes at least half of a
model step, else `model`. The ratios that decided it are printed with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import tempfile
from pathlib import Path

import torch

from fastft.atomic import write_json
from fastft.cli import USER_ERRORS, parser, run
from fastft.config import Config, ConfigError, load_config
from fastft.device import pick_device

from .ddp import KEY_BNS, bench_ddp
from .ddp import report as ddp_report
from .kernel import bench_kernel
from .loader import bench_loader, with_synthetic_data
from .report import describe, machine_info, report, verdict, versions
from .scaling import Cluster
from .scores import bench_scores
from .step import HeldBatches, bench_model_train, bench_step, make_trainer
from .timing import Settings

ALL = ("loader", "model", "step", "train", "kernel")  # what `all` runs
MODES = (*ALL, "all", "scores", "ddp")
PROG = "fastft-bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = parser(PROG, __doc__)
    ap.add_argument("mode", choices=MODES, help="what to measure (see above)")
    ap.add_argument("--config", required=True, help="a YAML file or a packaged config name (demo, in1k, ...)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="overrides run.device")
    ap.add_argument("--json", type=Path, help="also write every number, the machine, versions and config here")
    d = Settings()
    ap.add_argument("--steps", type=int, default=d.steps, help=f"timed steps or batches per run (default {d.steps})")
    ap.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed steps first in each run ({d.warmup})")
    ap.add_argument("--repeats", type=int, default=d.repeats, help=f"interleaved runs per candidate ({d.repeats})")
    ap.add_argument("--kernel-iters", type=int, default=d.kernel_iters, help="fwd+bwd calls per kernel run")
    ap.add_argument("--backends", help="loader backends to compare, comma-separated (default: all installed)")
    ap.add_argument("--batches", type=int, default=d.batches,
                    help=f"scores mode: real batches held in memory and cycled ({d.batches})")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); on a busy machine 1 is "
                                                "steadier than several threads competing for the same cores")
    ap.add_argument("--synthetic-data", type=int, metavar="N",
                    help="generate N photo-like JPEGs (500x375) as the train split and use them as data.path: "
                         "the real decode + augment path where no dataset exists")
    ap.add_argument("--synthetic-dir", type=Path, help="where to write (and reuse) them (default: a temp folder)")
    c = Cluster()
    ap.add_argument("--world", type=int, default=4, help="ddp mode: gloo processes (default 4)")
    ap.add_argument("--key-bn", default=",".join(KEY_BNS), help="ddp mode: model.key_bn choices to measure, "
                                                                 f"comma-separated (default {','.join(KEY_BNS)})")
    ap.add_argument("--model-batch", type=int, help="ddp mode: images per GPU in the scaling model (default: the "
                                                    "measured loader.batch_size; per-sample bytes scale with it)")
    ap.add_argument("--images-per-s", type=float, default=c.images_per_s,
                    help=f"ddp mode: one GPU's training throughput in the model ({c.images_per_s:.0f})")
    ap.add_argument("--net-gbs", type=float, default=c.net_bytes_per_s / 1e9,
                    help=f"ddp mode: GB/s per GPU between nodes in the model ({c.net_bytes_per_s / 1e9:.0f})")
    ap.add_argument("--nvlink-gbs", type=float, default=c.nvlink_bytes_per_s / 1e9,
                    help=f"ddp mode: GB/s per GPU within a node ({c.nvlink_bytes_per_s / 1e9:.0f})")
    ap.add_argument("--gpus-per-node", type=int, default=c.gpus_per_node,
                    help=f"ddp mode: GPUs per node in the model ({c.gpus_per_node})")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides, e.g. loader.batch_size=256")
    args = ap.parse_intermixed_args(argv)
    for name in ("steps", "repeats", "kernel_iters", "batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be at least 0")
    if args.mode == "ddp":
        bad = [k for k in args.key_bn.split(",") if k not in KEY_BNS]
        if bad:
            ap.error(f"--key-bn: {bad[0]!r} is not a model.key_bn; valid: {', '.join(KEY_BNS)}")
        if args.world < 2:
            ap.error(f"--world {args.world}: ddp mode needs at least 2 processes")
        if args.warmup < 1:
            ap.error("--warmup must be at least 1 in ddp mode (DDP rebuilds its buckets after the first step)")
        if args.device == "cuda":
            ap.error("--device cuda: ddp mode runs gloo processes on the CPU")
        for name in ("model_batch", "images_per_s", "net_gbs", "nvlink_gbs", "gpus_per_node"):
            value = getattr(args, name)
            if value is not None and value <= 0:
                ap.error(f"--{name.replace('_', '-')} must be positive (got {value})")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be at least 1")
    return args


def build_config(args: argparse.Namespace, tmp: Path) -> Config:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device cuda: no CUDA device is visible to torch {torch.__version__}")
    extra = [f"run.out_dir={tmp / 'run'}", "run.progress=false", "run.resume=none"]
    if args.device:
        extra.append(f"run.device={args.device}")
    cfg = load_config(args.config, [*args.overrides, *extra])
    if args.synthetic_data:
        cfg = with_synthetic_data(cfg, args.synthetic_data, args.synthetic_dir or tmp / "synthetic")
    return cfg


def run_bench(args: argparse.Namespace, tmp: Path) -> dict:
    cfg = build_config(args, tmp)
    device = pick_device(cfg.run.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings(args.steps, args.warmup, args.repeats, args.kernel_iters,
                 args.backends.split(",") if args.backends else None, args.batches)
    modes = ALL if args.mode == "all" else (args.mode,)
    load_before = os.getloadavg()[0]
    results: dict = {}
    notes: list[str] = []
    dtype = None
    if {"model", "step", "train"} & set(modes):
        synthetic = HeldBatches.synthetic(cfg, device)
        trainer = make_trainer(cfg, None if "train" in modes else synthetic)
        dtype = trainer.dtype
        try:
            if {"model", "train"} & set(modes):
                results.update(bench_model_train(trainer, synthetic, s, with_train="train" in modes))
            if "step" in modes:
                results["step"] = bench_step(trainer, synthetic, s)
        finally:
            trainer.log.close()
    if "kernel" in modes:
        results["kernel"] = bench_kernel(cfg, device, s, notes)
    if "scores" in modes:
        results["scores"] = bench_scores(cfg, device, s)
    if "ddp" in modes:
        results["ddp"] = bench_ddp(cfg, args.world, tuple(args.key_bn.split(",")), args.warmup, args.steps,
                                   args.threads or 1)
    if "loader" in modes:  # last: DALI's and numba's (FFCV) threads outlive their loaders and would share the
        results["loader"] = bench_loader(cfg, device, s, notes)  # CPU with the training runs above
    return {
        "fastft_bench": 1, "mode": args.mode, "command": "",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {**machine_info(device), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()[0]},
        "versions": versions(), "config": cfg.to_dict(), "synthetic_data": args.synthetic_data,
        "setup": describe(cfg, device, dtype) + (f" ({args.synthetic_data} generated JPEGs)" if args.synthetic_data
                                                 else ""),
        "settings": dataclasses.asdict(s), "results": results, "verdict": verdict(results), "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)

    def body() -> int:
        with tempfile.TemporaryDirectory(prefix="fastft-bench-") as tmp:
            record = run_bench(args, Path(tmp))
        record["command"] = " ".join([PROG, *argv])
        if args.mode == "ddp":
            cluster = Cluster(args.images_per_s, args.gpus_per_node, args.nvlink_gbs * 1e9, args.net_gbs * 1e9)
            model_batch = args.model_batch or record["results"]["ddp"]["batch"]
            record["scaling_model"] = {**dataclasses.asdict(cluster), "model_batch": model_batch}
            print(report(record, ddp_report(record["results"]["ddp"], cluster, model_batch)))
        else:
            print(report(record))
        if args.json:
            write_json(args.json, record, indent=1)
            print(f"wrote {args.json}")
        return 0

    return run(PROG, body, (*USER_ERRORS, ValueError, ImportError))
