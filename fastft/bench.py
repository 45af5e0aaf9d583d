"""Where the time goes: loader, training step and loss-kernel throughput, side by side, and the bottleneck.

    fastft-bench all    --config configs/demo.yaml --device cpu --json bench.json
    fastft-bench model  --config configs/in1k.yaml --device cuda loader.batch_size=256
    fastft-bench train  --config configs/in1k.yaml loader.batch_size=256 --synthetic-data 8192

Modes (an image is always two augmented views, through the query and the key encoder):
  loader  images/s of each installed loader backend on the config's data, alone (no model).
  model   the Trainer's own training loop on one synthetic batch already on the device: the upper bound of
          training throughput (no data cost).
  step    model again, with a clock at each phase of the step (query forward, momentum update + key forward,
          FT + loss forward, score statistics + enqueue, backward, optimizer): ms per phase. On a GPU the
          clock synchronises the device at every phase boundary, so its total runs a little above `model`.
  train   the Trainer's loop through the config's real loader, side by side with `model`: end-to-end images/s
          and the fraction of step time spent waiting for the next batch.
  kernel  forward + backward of the logits/loss kernel (Triton, where it runs) against the torch reference at
          the config's N (batch), K (queue), C (dim), without score statistics.
  all     every mode above, then the verdict.
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
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastft.pipelines.bench import bench_loaders, interleaved
from fastft.pipelines.builtin import is_builtin
from fastft.pipelines.loader import available_backends

from .bench_report import describe, machine_info, report, versions, write_json_atomic
from .bench_timing import (PhaseClock, SyntheticBatches, check_length, device_sync, kernel_impls, kernel_inputs,
                           run_steps, summarize, time_kernel)
from .config import Config, ConfigError, load_config
from .device import pick_device
from .distributed import cleanup

MODES = ("loader", "model", "step", "train", "kernel", "all")
DATA_RATIO = 0.9  # end to end below this fraction of model-only: data-bound (the project's speed target)
KERNEL_SHARE = 0.5  # the loss kernel taking at least this share of a model step: kernel-bound


@dataclass
class Settings:
    steps: int = 10  # timed steps (or loader batches) per run
    warmup: int = 3  # untimed steps first, in every run
    repeats: int = 5  # interleaved runs per candidate; medians reported
    kernel_iters: int = 10  # forward + backward calls per kernel run
    backends: list[str] | None = None  # loader mode; None = every installed backend


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


def _bar(total: int, desc: str) -> tqdm:
    """A progress bar on a terminal; in a log (gpu_check.sh tees to a file) one line per mode instead."""
    if not sys.stderr.isatty():
        print(f"fastft-bench: {desc}: {total} runs ({datetime.datetime.now():%H:%M:%S})", file=sys.stderr, flush=True)
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, leave=False, disable=None)


# -- modes ----------------------------------------------------------------------------------------------------


def bench_loader(cfg: Config, device: torch.device, s: Settings, notes: list[str]) -> dict:
    backends = list(s.backends or available_backends())
    if "ffcv" in backends and not is_builtin(cfg.data.path) and not cfg.loader.beton_dir:
        backends.remove("ffcv")  # it reads .beton files: none exist for this data without loader.beton_dir
        notes.append("loader: ffcv skipped (set loader.beton_dir to .beton files of this data)")
    warmup, steps = loader_plan(s, cfg.loader.workers)
    with _bar((s.repeats + 1) * len(backends), "loader") as bar:
        out = bench_loaders(cfg, backends, batches=steps, warmup=warmup, repeats=s.repeats, device=device, bar=bar)
    for r in out["backends"].values():
        r["views_per_s"] = 2 * r["images_per_s"]
    return out


def make_trainer(cfg: Config, synthetic: SyntheticBatches | None):
    """The real Trainer, writing into cfg.run.out_dir (a temp folder), on `synthetic` batches or (None) the
    config's loader."""
    from .train import Trainer  # the training entry point: the bench must time exactly what it runs

    trainer = Trainer(cfg, loader=synthetic)
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    if trainer.scores is not None:
        trainer.scores.begin(0, cfg.model.queue_size)  # as Trainer.run does before the first epoch
    return trainer


def bench_model_train(trainer, synthetic: SyntheticBatches, s: Settings, with_train: bool) -> dict:
    """model-only (and end to end, interleaved with it); the untimed first run of each is warm-up + one step."""
    real = trainer.loader

    def runner(source, warmup: int, steps: int):
        return lambda i: run_steps(trainer, source, warmup, steps if i else 1)

    fns = {"model": runner(synthetic, s.warmup, s.steps)}
    plan = {"model": (s.warmup, s.steps)}
    if with_train:
        plan["train"] = loader_plan(s, trainer.cfg.loader.workers)
        check_length(real, *plan["train"])  # before any timing, not after minutes of it
        fns["train"] = runner(real, *plan["train"])
    with _bar((s.repeats + 1) * len(fns), "model/train" if with_train else "model") as bar:
        runs = interleaved(fns, s.repeats, bar=bar)
    out = {name: {**summarize(r), "warmup": plan[name][0], "steps": plan[name][1]} for name, r in runs.items()}
    if with_train:
        out["train"]["backend"] = trainer.cfg.loader.backend
        out["train"]["workers"] = trainer.cfg.loader.workers
    return out


def bench_step(trainer, synthetic: SyntheticBatches, s: Settings) -> dict:
    clock = PhaseClock(trainer, device_sync(trainer.device))
    try:
        with _bar(s.repeats + 1, "step") as bar:
            runs = interleaved({"step": lambda i: run_steps(trainer, synthetic, s.warmup, s.steps if i else 1,
                                                            clock)}, s.repeats, bar=bar)
    finally:
        clock.close()
    return summarize(runs["step"])


def bench_kernel(cfg: Config, device: torch.device, s: Settings, notes: list[str]) -> dict:
    impls, used, why = kernel_impls(cfg, device)
    notes.extend(why)
    x = kernel_inputs(cfg, device)
    sync = device_sync(device)
    fns = {name: (lambda i, fn=fn: time_kernel(fn, x, s.kernel_iters if i else 1, sync)) for name, fn in impls.items()}
    with _bar((s.repeats + 1) * len(fns), "kernel") as bar:
        runs = interleaved(fns, s.repeats, bar=bar)
    ms = {name: statistics.median(v) for name, v in runs.items()}
    return {
        "N": cfg.loader.batch_size, "K": cfg.model.queue_size, "C": cfg.model.dim,
        "interpolate": cfg.ft.neg == "interpolate", "queue_dtype": cfg.loss.queue_dtype, "used_by_training": used,
        "impls": {name: {"fwd_bwd_ms": ms[name], "speedup_vs_torch": ms["torch"] / ms[name], "runs_ms": runs[name]}
                  for name in impls},
    }


# -- verdict --------------------------------------------------------------------------------------------------


def verdict(results: dict) -> dict:
    """{"bottleneck": "data" | "model" | "kernel" | None, "ratios": {...}, "text": one line}."""
    ratios: dict[str, float] = {}
    reasons: list[str] = []
    model = results.get("model")
    step_ms = model["step_ms"] if model else results.get("step", {}).get("step_ms")
    if "train" in results:
        ratios["train_over_model"] = results["train"]["images_per_s"] / model["images_per_s"]
        ratios["data_wait_fraction"] = results["train"]["data_wait_fraction"]
        reasons.append(f"end to end {ratios['train_over_model']:.2f}x model-only "
                       f"({ratios['data_wait_fraction']:.0%} of step time waiting for data)")
        gap = 1 - ratios["train_over_model"]
        if gap > 1 - DATA_RATIO and ratios["data_wait_fraction"] < gap / 2:
            # Slower without waiting: the loader's processes take CPU from the step (or the machine was noisy).
            reasons.append("most of the gap is not waiting: loading competes with the step for the CPU")
    loader = results.get("loader", {}).get("backends", {})
    if loader and model:
        name = max(loader, key=lambda b: loader[b]["images_per_s"])
        ratios["loader_over_model"] = loader[name]["images_per_s"] / model["images_per_s"]
        reasons.append(f"fastest loader alone ({name}) {loader[name]['images_per_s']:.0f} img/s = "
                       f"{ratios['loader_over_model']:.2f}x the model's {model['images_per_s']:.0f}")
    kernel = results.get("kernel")
    if kernel and step_ms:
        k_ms = kernel["impls"][kernel["used_by_training"]]["fwd_bwd_ms"]
        ratios["kernel_share_of_step"] = k_ms / step_ms
        reasons.append(f"loss kernel ({kernel['used_by_training']}) {k_ms:.2f} ms = "
                       f"{ratios['kernel_share_of_step']:.1%} of a {step_ms:.1f} ms model step")

    if "train_over_model" in ratios:
        data_bound = ratios["train_over_model"] < DATA_RATIO
    else:
        data_bound = ratios.get("loader_over_model", float("inf")) < 1.0
    if data_bound:
        bottleneck, hint = "data", "more loader.workers or a faster loader.backend"
    elif "kernel_share_of_step" in ratios and ratios["kernel_share_of_step"] >= KERNEL_SHARE:
        bottleneck, hint = "kernel", "loss.kernel, loss.queue_dtype"
    elif step_ms:
        bottleneck, hint = "model", "compute-bound: run.precision, run.channels_last, run.compile"
    else:
        return {"bottleneck": None, "ratios": ratios,
                "text": "verdict: none (needs the model step: modes model, step, train or all)"}
    missing = [m for m, have in (("data", "train" in results or bool(loader)), ("kernel", "kernel" in results))
               if not have]
    text = f"verdict: {bottleneck}" + (f" -- {'; '.join(reasons)}" if reasons else "") + f" [{hint}]"
    if missing:
        text += f" (not measured: {', '.join(missing)}; mode all measures everything)"
    return {"bottleneck": bottleneck, "ratios": ratios, "text": text}


# -- command line ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="fastft-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=MODES, help="what to measure (see above)")
    ap.add_argument("--config", required=True, help="YAML config file (see configs/)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="overrides run.device")
    ap.add_argument("--json", type=Path, help="also write every number, the machine, versions and config here")
    d = Settings()
    ap.add_argument("--steps", type=int, default=d.steps, help=f"timed steps or batches per run (default {d.steps})")
    ap.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed steps first in each run ({d.warmup})")
    ap.add_argument("--repeats", type=int, default=d.repeats, help=f"interleaved runs per candidate ({d.repeats})")
    ap.add_argument("--kernel-iters", type=int, default=d.kernel_iters, help="fwd+bwd calls per kernel run")
    ap.add_argument("--backends", help="loader backends to compare, comma-separated (default: all installed)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); on a busy machine 1 is "
                                                "steadier than several threads competing for the same cores")
    ap.add_argument("--synthetic-data", type=int, metavar="N",
                    help="generate N photo-like JPEGs (500x375) as the train split and use them as data.path: "
                         "the real decode + augment path where no dataset exists")
    ap.add_argument("--synthetic-dir", type=Path, help="where to write (and reuse) them (default: a temp folder)")
    ap.add_argument("overrides", nargs="*", help="key.sub=value config overrides, e.g. loader.batch_size=256")
    args = ap.parse_intermixed_args(argv)
    for name in ("steps", "repeats", "kernel_iters"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        ap.error("--warmup must be at least 0")
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
        from fastft.pipelines.synthetic import write_synthetic_folder

        root = args.synthetic_dir or tmp / "synthetic"
        tqdm.write(f"fastft-bench: writing {args.synthetic_data} synthetic JPEGs into {root}", file=sys.stderr)
        write_synthetic_folder(root / cfg.data.train_split, args.synthetic_data)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(root)))
        if "ffcv" in available_backends() and not cfg.loader.beton_dir:
            cfg = _with_beton(cfg, root)
    return cfg


def _with_beton(cfg: Config, root: Path) -> Config:
    """The generated train split as a .beton beside it, stored as JPEG at its own resolution (as the source
    files), so FFCV is measured on the same images as the other backends."""
    from fastft.pipelines.convert import convert

    betons = root / "betons"
    beton = betons / f"{cfg.data.train_split}.beton"
    if not beton.is_file():
        betons.mkdir(parents=True, exist_ok=True)
        tqdm.write(f"fastft-bench: converting them to {beton}", file=sys.stderr)
        convert(str(root / cfg.data.train_split), beton, write_mode="jpg", force=True)
    return dataclasses.replace(cfg, loader=dataclasses.replace(cfg.loader, beton_dir=str(betons)))


def run_bench(args: argparse.Namespace, tmp: Path) -> dict:
    cfg = build_config(args, tmp)
    device = pick_device(cfg.run.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings(args.steps, args.warmup, args.repeats, args.kernel_iters,
                 args.backends.split(",") if args.backends else None)
    modes = MODES[:-1] if args.mode == "all" else (args.mode,)
    load_before = os.getloadavg()[0]
    results: dict = {}
    notes: list[str] = []
    trainer = None
    if {"model", "step", "train"} & set(modes):
        synthetic = SyntheticBatches(cfg, device)
        trainer = make_trainer(cfg, None if "train" in modes else synthetic)
        if {"model", "train"} & set(modes):
            results.update(bench_model_train(trainer, synthetic, s, with_train="train" in modes))
        if "step" in modes:
            results["step"] = bench_step(trainer, synthetic, s)
        trainer.log.close()
    if "kernel" in modes:
        results["kernel"] = bench_kernel(cfg, device, s, notes)
    if "loader" in modes:  # last: DALI's and numba's (FFCV) threads outlive their loaders and would share the
        results["loader"] = bench_loader(cfg, device, s, notes)  # CPU with the training runs above
    return {
        "fastft_bench": 1, "mode": args.mode, "command": "",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {**machine_info(device), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()[0]},
        "versions": versions(), "config": cfg.to_dict(), "synthetic_data": args.synthetic_data,
        "setup": describe(cfg, device, trainer) + (f" ({args.synthetic_data} generated JPEGs)" if args.synthetic_data
                                                   else ""),
        "settings": dataclasses.asdict(s), "results": results, "verdict": verdict(results), "notes": notes,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="fastft-bench-") as tmp:
            record = run_bench(args, Path(tmp))
            record["command"] = " ".join(["fastft-bench", *argv])
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"fastft-bench: error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    print(report(record))
    if args.json:
        write_json_atomic(args.json, record)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
