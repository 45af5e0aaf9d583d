"""`python -m fastft.ablation [--epochs E] [--seeds S ...] [key.sub=value ...]` (also `make ablation`).

Trains MoCo v2, + positive extrapolation, + negative interpolation and + both (configs/ablations/*.yaml: the
demo's recipe, configs/demo.yaml, with only ft.pos / ft.neg changed; tests/test_config.py holds them to it) on
the CPU, one run per variant and seed, one after another, each followed by a linear probe on cached features
(and, once per seed, the same probe of the encoder at random initialisation). Every step is its own fastft-train
or fastft-linear process, so an interrupted ablation started again resumes each run and probe on its own and
reuses what finished. Then draws all runs side by side with fastft-viz and writes the kNN and linear top-1 table
with score statistics, and the command that produced it, to a markdown file (ABLATION.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

from . import checkpoint as ckpt_io
from .config import ConfigError, find_config, load_config
from .atomic import write_json, write_text
from .metrics import read_metrics, run_results
from .score_stats import COLLAPSED_NEG_VAR, ScoresError, read_scores

RUN_FILE = "ablation_run.json"  # per run: the command that trained it and how long it took
# name -> (config file under --configs, what it adds)
VARIANTS = {
    "mocov2": ("mocov2.yaml", "MoCo v2"),
    "pos": ("pos.yaml", "+ pos extrapolation"),
    "neg": ("neg.yaml", "+ neg interpolation"),
    "both": ("both.yaml", "+ both (full FT)"),
    # The authors' one-sided per-element variants (configs/ablations/*_elementwise.yaml): --variants to add them.
    "pos_elementwise": ("pos_elementwise.yaml", "+ pos extrapolation, per element"),
    "neg_elementwise": ("neg_elementwise.yaml", "+ neg interpolation, per element"),
}
DEFAULT_VARIANTS = ["mocov2", "pos", "neg", "both"]


@dataclass
class RunResult:
    variant: str
    seed: int
    run_dir: Path
    knn_top1: float | None = None
    knn_init_top1: float | None = None
    knn_pixels_top1: float | None = None
    linear_top1: float | None = None
    linear_init_top1: float | None = None  # probed for the first variant of each seed
    seconds: float | None = None  # training + probe wall time (recorded in RUN_FILE, also for runs reused later)
    reused: bool = False  # finished by an earlier invocation
    final_loss: float | None = None  # mean loss of the last epoch
    queue_size: int | None = None
    last_epoch: dict[str, float] = field(default_factory=dict)  # score means over the last epoch's steps


def final_knn(records: list[dict], epochs: int) -> float | None:
    """kNN top-1 logged at the end of epoch `epochs` (summary.json is rewritten without it on a re-run)."""
    found = [r["knn_top1"] for r in records if r.get("kind") == "epoch" and r.get("epoch") == epochs
             and isinstance(r.get("knn_top1"), (int, float))]
    return found[-1] if found else None


def last_epoch_scores(run_dir: Path) -> dict[str, float]:
    try:
        s = read_scores(run_dir)
    except ScoresError:
        return {}
    last = s.epochs == s.epochs.max()
    keys = [f"{feat}_{name}" for feat in ("ft", "raw") for name in ("pos_mean", "neg_mean", "neg_var")]
    return {k: float(np.nanmean(s.series[k][last])) for k in keys if np.isfinite(s.series[k][last]).any()}


def train_command(config: Path, run_dir: Path, seed: int, epochs: int, overrides: list[str],
                  baselines: bool = True) -> list[str]:
    """fastft-train for one run; `baselines`: also kNN the random-init encoder and the pixels (the first variant
    of each seed: the other variants of that seed start from the same network)."""
    return [sys.executable, "-m", "fastft.train", str(config), f"run.out_dir={run_dir}", f"run.seed={seed}",
            f"optim.epochs={epochs}", f"knn.every={epochs}", f"knn.random_init={str(baselines).lower()}",
            f"knn.pixels={str(baselines).lower()}", "run.progress=false", "scores.untransformed=true", *overrides]


def probe_command(train: list[str], random_init: bool) -> list[str]:
    """fastft-linear on the run `train` wrote (its newest checkpoint), with the same config and overrides."""
    return [sys.executable, "-m", "fastft.linear", *train[3:], "linear.cache_features=true",
            *(["--compare-random-init"] if random_init else [])]


def finished_with_same_config(cmd: list[str], run_dir: Path, epochs: int) -> bool:
    """Whether `run_dir` already holds this exact run, finished (so it is not trained again)."""
    if final_knn(read_metrics(run_dir), epochs) is None or not (run_dir / "config.yaml").is_file():
        return False
    wanted = load_config(cmd[3], cmd[4:]).to_dict()
    ckpt_io.check_compatible(yaml.safe_load((run_dir / "config.yaml").read_text()), wanted, run_dir / "config.yaml")
    return True


def run_logged(cmd: list[str], run_dir: Path, threads: int) -> None:
    """Run `cmd` with its output appended to run_dir/train.log; a failure raises with the log's last lines."""
    env = dict(os.environ)
    if threads:  # torch reads these when it starts: its CPU threads for the run
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join((run_dir / "train.log").read_text().splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(cmd[1:4])} ... for {run_dir} failed (exit {proc.returncode}); end of "
                           f"{run_dir / 'train.log'}:\n{tail}")


def run_one(variant: str, seed: int, args: argparse.Namespace, baselines: bool) -> RunResult:
    """Train one variant with one seed (unless finished earlier), probe it (fastft-linear reuses a finished
    probe), and collect its numbers; `baselines` also measures the random-init encoder of this seed (kNN and
    probe) and the pixels."""
    config = Path(args.configs) / VARIANTS[variant][0]
    run_dir = Path(args.out) / f"{variant}_s{seed}"
    cmd = train_command(config, run_dir, seed, args.epochs, args.overrides, baselines)
    res = RunResult(variant, seed, run_dir)
    t0 = time.perf_counter()
    if finished_with_same_config(cmd, run_dir, args.epochs):
        print(f"  {run_dir}: already trained, reusing it", flush=True)
        res.reused = True
        if (run_dir / RUN_FILE).is_file():
            res.seconds = json.loads((run_dir / RUN_FILE).read_text()).get("seconds")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"  {run_dir}: {shlex.join(cmd[1:])}", flush=True)
        run_logged(cmd, run_dir, args.threads)
    probe = probe_command(cmd, baselines)
    run_logged(probe, run_dir, args.threads)
    if not res.reused:
        res.seconds = time.perf_counter() - t0
        write_json(run_dir / RUN_FILE, {"command": shlex.join(cmd[1:]), "probe": shlex.join(probe[1:]),
                                        "seconds": res.seconds, "threads": args.threads or None}, indent=None)
    records = read_metrics(run_dir)
    found = run_results(run_dir, records)
    res.knn_top1 = final_knn(records, args.epochs)
    res.knn_init_top1, res.knn_pixels_top1 = found.get("kNN random init"), found.get("kNN pixels")
    res.linear_top1, res.linear_init_top1 = found.get("linear"), found.get("linear random init")
    losses = [r["loss"] for r in records if r.get("kind") == "epoch" and r.get("epoch") == args.epochs]
    res.final_loss = losses[-1] if losses else None
    res.queue_size = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["queue_size"]
    res.last_epoch = last_epoch_scores(run_dir)
    print(f"  {run_dir}: kNN top-1 {_pct(res.knn_top1)}, linear top-1 {_pct(res.linear_top1)}"
          + (f" ({res.seconds / 60:.1f} min)" if res.seconds else ""), flush=True)
    return res


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{100 * xs[0]:.2f}"
    return f"{100 * statistics.mean(xs):.2f} ± {100 * statistics.stdev(xs):.2f}"


def _score_mean(results: list[RunResult], key: str) -> float | None:
    xs = [r.last_epoch[key] for r in results if key in r.last_epoch]
    return statistics.mean(xs) if xs else None


def _pair(results: list[RunResult], key: str, digits: int) -> str:
    """'used / untransformed' means of a last-epoch score statistic."""
    used, raw = _score_mean(results, f"ft_{key}"), _score_mean(results, f"raw_{key}")
    fmt = lambda x: "-" if x is None else f"{x:.{digits}f}"
    return f"{fmt(used)} / {fmt(raw)}"


def collapsed(r: RunResult) -> bool:
    """Every key points one way: the untransformed negative scores have (almost) no variance left."""
    return r.last_epoch.get("raw_neg_var", 1.0) < COLLAPSED_NEG_VAR


def _values(results: list[RunResult], variant: str, attr: str) -> list[float]:
    return [getattr(r, attr) for r in results if r.variant == variant and getattr(r, attr) is not None]


def _baseline(results: list[RunResult], attr: str) -> float | None:
    """Mean over seeds of a baseline every run of a seed shares (random init, pixels)."""
    by_seed = {r.seed: getattr(r, attr) for r in results if getattr(r, attr) is not None}
    return statistics.mean(by_seed.values()) if by_seed else None


def observations(results: list[RunResult], variants: list[str]) -> str:
    """What the numbers show, computed from them (so the text cannot drift from the table)."""
    lines = []
    for attr, init_attr, what in (("knn_top1", "knn_init_top1", "kNN"), ("linear_top1", "linear_init_top1", "linear")):
        init = _baseline(results, init_attr)
        for v in variants if init is not None else []:
            if xs := _values(results, v, attr):
                lines.append(f"- {VARIANTS[v][1]}: mean {what} top-1 {100 * (statistics.mean(xs) - init):+.2f} "
                             f"points against the same encoders at random initialisation ({100 * init:.2f}).")
    if (pixels := _baseline(results, "knn_pixels_top1")) is not None:
        best = max((statistics.mean(xs), v) for v in variants if (xs := _values(results, v, "knn_top1")))
        lines.append(f"- Raw pixels give kNN top-1 {100 * pixels:.2f}; the best variant ({VARIANTS[best[1]][1]}) is "
                     f"{100 * (best[0] - pixels):+.2f} points from them.")
    for v in variants:
        rs = [r for r in results if r.variant == v]
        down = [r for r in rs if collapsed(r)]
        if down:
            r = down[0]
            lines.append(f"- {VARIANTS[v][1]}: the projection collapsed in {len(down)} of {len(rs)} runs (last "
                         f"epoch, untransformed: pos mean {r.last_epoch['raw_pos_mean']:.4f}, neg mean "
                         f"{r.last_epoch['raw_neg_mean']:.4f}, neg variance {r.last_epoch['raw_neg_var']:.1e} in "
                         f"{r.run_dir.name}): every key points the same way"
                         + (f"; its last-epoch loss is {r.final_loss:.4f} against ln(1 + K) = "
                            f"{math.log(1 + r.queue_size):.4f} for scores that cannot tell the positive from the "
                            f"negatives" if r.final_loss is not None and r.queue_size else "")
                         + ". See its density figure.")
    var = [r.last_epoch["raw_neg_var"] for r in results if "raw_neg_var" in r.last_epoch]
    if var and not any(collapsed(r) for r in results):
        lines.append(f"- No run collapsed: the untransformed neg variance of the last epoch is {min(var):.4f} or more "
                     f"in every run (a collapsed projection has less than {COLLAPSED_NEG_VAR:g}).")
    for attr, what in (("knn_top1", "kNN"), ("linear_top1", "linear")):
        means = {v: xs for v in variants if (xs := _values(results, v, attr))}
        if len(means) > 1:
            m = {v: statistics.mean(xs) for v, xs in means.items()}
            stds = [statistics.stdev(xs) for xs in means.values() if len(xs) > 1]
            best = max(m, key=m.get)
            lines.append(f"- Highest mean {what} top-1: {VARIANTS[best][1]} ({100 * m[best]:.2f}). Variant means span "
                         f"{100 * (max(m.values()) - min(m.values())):.2f} points"
                         + (f"; the seed-to-seed std averages {100 * statistics.mean(stds):.2f} points" if stds else "")
                         + ".")
    for v, key, what in (("pos", "pos_mean", "pos mean"), ("both", "pos_mean", "pos mean"),
                         ("neg", "neg_var", "neg variance"), ("both", "neg_var", "neg variance")):
        rs = [r for r in results if r.variant == v]
        used, raw = _score_mean(rs, f"ft_{key}"), _score_mean(rs, f"raw_{key}")
        if used is not None and raw is not None:
            rel = "lower" if used < raw else "not lower"
            lines.append(f"- {VARIANTS[v][1]}: the {what} of the scores the loss used is {rel} than on the "
                         f"untransformed features ({used:.4f} vs {raw:.4f}, last epoch).")
    return "\n".join(lines)


def _per_seed(by_seed: dict[int, RunResult], seeds: list[int], attr: str) -> str:
    return " / ".join(_pct(getattr(by_seed[s], attr)) if s in by_seed else "-" for s in seeds)


def recipe(config: dict) -> str:
    """The budget the runs shared, read from a run's config.yaml."""
    d, lo, m, o = config["data"], config["loader"], config["model"], config["optim"]
    return (f"`{d['path']}` at {d['image_size']}x{d['image_size']}, {m['arch']}"
            + (" small stem" if m["small_stem"] else "") + f", {m['head']} head, batch {lo['batch_size']}, "
            f"queue {m['queue_size']}, T {m['temperature']}, momentum {m['momentum']}, lr {o['lr']} per "
            f"{o['lr_batch']} images, {o['warmup_epochs']} warm-up epoch(s), {o['epochs']} epochs")


def markdown(results: list[RunResult], args: argparse.Namespace, command: str, wall: float, figures: Path) -> str:
    seeds = list(args.seeds)
    seed_list = " / ".join(str(s) for s in seeds)
    head = (f"| variant | config | kNN top-1 (seeds {seed_list}) | kNN mean ± std | linear top-1 (seeds {seed_list}) "
            "| linear mean ± std | pos mean: used / untransformed | neg var: used / untransformed |")
    rule = "|" + "---|" * (head.count("|") - 1)
    rows = []
    for v in args.variants:
        rs = [r for r in results if r.variant == v]
        by_seed = {r.seed: r for r in rs}
        rows.append(f"| {VARIANTS[v][1]} | `{Path(args.configs) / VARIANTS[v][0]}` | "
                    f"{_per_seed(by_seed, seeds, 'knn_top1')} | {_mean_std(_values(results, v, 'knn_top1'))} | "
                    f"{_per_seed(by_seed, seeds, 'linear_top1')} | {_mean_std(_values(results, v, 'linear_top1'))} | "
                    f"{_pair(rs, 'pos_mean', 3)} | {_pair(rs, 'neg_var', 4)} |")
    first = {}  # the first variant of each seed: the run that measured the random-init baselines
    for r in results:
        first.setdefault(r.seed, r)
    init = {key: [getattr(r, key) for r in first.values() if getattr(r, key) is not None]
            for key in ("knn_init_top1", "linear_init_top1")}
    rows.append(f"| random init (same seeds) | | {_per_seed(first, seeds, 'knn_init_top1')} | "
                f"{_mean_std(init['knn_init_top1'])} | {_per_seed(first, seeds, 'linear_init_top1')} | "
                f"{_mean_std(init['linear_init_top1'])} | | |")
    pixels = _baseline(results, "knn_pixels_top1")
    rows.append(f"| raw pixels | | | {_pct(pixels)} | | | | |")
    trained = [r.seconds for r in results if r.seconds is not None]
    reused = sum(r.reused for r in results)
    timing = (f"training and probes took {sum(trained) / 60:.1f} min in all, {statistics.mean(trained) / 60:.1f} min "
              f"per run" if trained else "training times were not recorded")
    timing += f"; this invocation took {wall / 60:.1f} min" + (f" ({reused} runs reused from an earlier one)"
                                                               if reused else "")
    last = train_command(Path(args.configs) / VARIANTS[args.variants[-1]][0],
                         Path(args.out) / f"{args.variants[-1]}_s{seeds[0]}", seeds[0], args.epochs, args.overrides)
    config = yaml.safe_load((results[-1].run_dir / "config.yaml").read_text())
    return f"""# Ablation: Feature Transformation on the CPU

Produced by this command, run from the repository root (`make ablation` runs it with the defaults):

    {command}

{len(results)} runs ({len(args.variants)} variants x {len(seeds)} seeds), trained one after another, each as

    {shlex.join(["python", *last[1:]])}

then probed as

    {shlex.join(["python", *probe_command(last, False)[1:]])}

(with that variant's config, seed and folder; the first variant of each seed adds `--compare-random-init`).
Recipe: {recipe(config)}; kNN (k {config['knn']['k']}, T {config['knn']['temperature']}) on the val split after
the last epoch; linear probe of {config['linear']['epochs']} epochs on cached features. Written
{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {platform.machine()} Linux, {os.cpu_count()} CPU
cores, torch fp32; {timing}.

Top-1 on the val split in percent. The last two columns are score statistics of the last epoch (batch means, see
`fastft/score_stats.py`, averaged over seeds): on the scores the loss used (after FT) and on the untransformed
features of the same step (q . k, q . stored queue).

{head}
{rule}
{chr(10).join(rows)}

{observations(results, list(args.variants))}

Figures (`fastft-viz` over all runs; not committed): `{figures}`.
"""


def draw_figures(results: list[RunResult], out: Path) -> Path:
    """fastft-viz over all runs (as its own process: nothing imports an entry point)."""
    cmd = [sys.executable, "-m", "fastft.viz", *[str(r.run_dir) for r in results], "--out", str(out),
           "--labels", *[f"{r.variant}_s{r.seed}" for r in results]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd[1:])} failed: {proc.stderr.strip()}")
    return out / "index.html"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fastft.ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*",
                    help="extra key.sub=value overrides for every run (before the options, or after --)")
    ap.add_argument("--epochs", type=int, help="pretraining epochs of every run (default: the configs' optim.epochs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                    help=f"which variants to train (default: {' '.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--configs", default="configs/ablations",
                    help="folder of the variant configs (default: configs/ablations, the packaged ones when there "
                         "is no such folder here)")
    ap.add_argument("--out", default="runs/ablation", help="folder for the runs (one sub-folder each)")
    ap.add_argument("--table", default="ABLATION.md", help="markdown file for the table")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads per run (default: torch's choice; 1 is faster on oversubscribed cores)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "fastft.ablation", *argv])
    t0 = time.perf_counter()
    try:
        for v in args.variants:  # configs/ablations/x.yaml is the packaged one where no such file is here
            find_config(Path(args.configs) / VARIANTS[v][0])
        if args.epochs is None:
            args.epochs = load_config(Path(args.configs) / VARIANTS[args.variants[0]][0], args.overrides).optim.epochs
        results = []
        for seed in args.seeds:
            for i, v in enumerate(args.variants):
                results.append(run_one(v, seed, args, baselines=i == 0))
        index = draw_figures(results, Path(args.out) / "viz")
    except (ConfigError, ckpt_io.CheckpointError, RuntimeError) as e:
        print(f"python -m fastft.ablation: error: {e}", file=sys.stderr)
        return 2
    text = markdown(results, args, command, time.perf_counter() - t0, index)
    write_text(args.table, text)
    print(f"python -m fastft.ablation: table in {args.table}, figures in {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
