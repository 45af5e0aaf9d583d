"""`python -m fastft.ablation [--epochs E] [--seeds S ...] [key.sub=value ...]` (also `make ablation`).

Trains MoCo v2, + positive extrapolation, + negative interpolation and + both (configs/ablations/*.yaml: the
same data, model, seed and budget; only ft.pos / ft.neg differ) on the built-in digits on the CPU, one run per
variant and seed, one after another (each its own fastft-train process, so each resumes on its own if the
ablation is interrupted and started again). Then draws all runs side by side with fastft-viz and writes the
kNN top-1 table, with the command that produced it, to a markdown file (ABLATION.md).
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
from .metrics import read_metrics
from .score_stats import ScoresError, read_scores

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
    seconds: float | None = None  # training wall time (recorded in RUN_FILE, also for runs reused later)
    reused: bool = False  # finished by an earlier invocation
    final_loss: float | None = None  # mean loss of the last epoch
    queue_size: int | None = None
    last_epoch: dict[str, float] = field(default_factory=dict)  # score means over the last epoch's steps


def final_knn(records: list[dict], epochs: int) -> float | None:
    """kNN top-1 logged at the end of epoch `epochs` (summary.json is rewritten without it on a re-run)."""
    found = [r["knn_top1"] for r in records if r.get("kind") == "epoch" and r.get("epoch") == epochs
             and isinstance(r.get("knn_top1"), (int, float))]
    return found[-1] if found else None


def init_knn(records: list[dict]) -> float | None:
    found = [r.get("random_init_top1", r.get("top1")) for r in records  # "top1" in runs before 0.2
             if r.get("kind") == "knn" and r.get("step") == 0]
    return found[-1] if found else None


def last_epoch_scores(run_dir: Path) -> dict[str, float]:
    try:
        s = read_scores(run_dir)
    except ScoresError:
        return {}
    last = s.epochs == s.epochs.max()
    keys = [f"{feat}_{name}" for feat in ("ft", "raw") for name in ("pos_mean", "neg_mean", "neg_var")]
    return {k: float(np.nanmean(s.series[k][last])) for k in keys if np.isfinite(s.series[k][last]).any()}


def train_command(config: Path, run_dir: Path, seed: int, epochs: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "fastft.train", str(config), f"run.out_dir={run_dir}", f"run.seed={seed}",
            f"optim.epochs={epochs}", f"knn.every={epochs}", "knn.pixels=false", "run.progress=false",
            "scores.untransformed=true", *overrides]


def finished_with_same_config(cmd: list[str], run_dir: Path, epochs: int) -> bool:
    """Whether `run_dir` already holds this exact run, finished (so it is not trained again)."""
    if final_knn(read_metrics(run_dir), epochs) is None or not (run_dir / "config.yaml").is_file():
        return False
    wanted = load_config(cmd[3], cmd[4:]).to_dict()
    ckpt_io.check_compatible(yaml.safe_load((run_dir / "config.yaml").read_text()), wanted, run_dir / "config.yaml")
    return True


def run_one(variant: str, seed: int, args: argparse.Namespace) -> RunResult:
    config = Path(args.configs) / VARIANTS[variant][0]
    run_dir = Path(args.out) / f"{variant}_s{seed}"
    cmd = train_command(config, run_dir, seed, args.epochs, args.overrides)
    res = RunResult(variant, seed, run_dir)
    if finished_with_same_config(cmd, run_dir, args.epochs):
        print(f"  {run_dir}: already trained, reusing it", flush=True)
        res.reused = True
        if (run_dir / RUN_FILE).is_file():
            res.seconds = json.loads((run_dir / RUN_FILE).read_text()).get("seconds")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"  {run_dir}: {shlex.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        env = dict(os.environ)
        if args.threads:  # torch reads these when it starts: its CPU threads for the run
            env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        with open(run_dir / "train.log", "a") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        res.seconds = time.perf_counter() - t0
        write_json(run_dir / RUN_FILE, {"command": shlex.join(cmd[1:]), "seconds": res.seconds,
                                        "threads": args.threads or None}, indent=None)
        if proc.returncode != 0:
            tail = "\n".join((run_dir / "train.log").read_text().splitlines()[-15:])
            raise RuntimeError(f"training {run_dir} failed (exit {proc.returncode}); end of {run_dir / 'train.log'}:\n{tail}")
    records = read_metrics(run_dir)
    res.knn_top1, res.knn_init_top1 = final_knn(records, args.epochs), init_knn(records)
    losses = [r["loss"] for r in records if r.get("kind") == "epoch" and r.get("epoch") == args.epochs]
    res.final_loss = losses[-1] if losses else None
    res.queue_size = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["queue_size"]
    res.last_epoch = last_epoch_scores(run_dir)
    print(f"  {run_dir}: kNN top-1 {res.knn_top1}" + (f" ({res.seconds / 60:.1f} min)" if res.seconds else ""),
          flush=True)
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


COLLAPSED_NEG_MEAN, COLLAPSED_NEG_VAR = 0.95, 1e-4


def observations(results: list[RunResult], variants: list[str]) -> str:
    """What the numbers show, computed from them (so the text cannot drift from the table)."""
    lines = []
    inits = [r.knn_init_top1 for r in results if r.knn_init_top1 is not None]
    if inits:
        init = statistics.mean(inits)
        for v in variants:
            knns = [r.knn_top1 for r in results if r.variant == v and r.knn_top1 is not None]
            if knns:
                gain = 100 * (statistics.mean(knns) - init)
                lines.append(f"- {VARIANTS[v][1]}: mean kNN top-1 {gain:+.2f} points against the same encoders at "
                             f"random initialisation ({100 * init:.2f}).")
    for v in variants:
        rs = [r for r in results if r.variant == v]
        collapsed = [r for r in rs if r.last_epoch.get("raw_neg_mean", 0) > COLLAPSED_NEG_MEAN
                     and r.last_epoch.get("raw_neg_var", 1) < COLLAPSED_NEG_VAR]
        if collapsed:
            r = collapsed[0]
            lines.append(f"- {VARIANTS[v][1]}: the projection collapsed in {len(collapsed)} of {len(rs)} runs (last "
                         f"epoch, untransformed: pos mean {r.last_epoch['raw_pos_mean']:.4f}, neg mean "
                         f"{r.last_epoch['raw_neg_mean']:.4f}, neg variance {r.last_epoch['raw_neg_var']:.1e} in "
                         f"{r.run_dir.name}): every key points the same way"
                         + (f"; its last-epoch loss is {r.final_loss:.4f} against ln(1 + K) = "
                            f"{math.log(1 + r.queue_size):.4f} for scores that cannot tell the positive from the "
                            f"negatives" if r.final_loss is not None and r.queue_size else "")
                         + ". See its density figure.")
    means = {v: [r.knn_top1 for r in results if r.variant == v and r.knn_top1 is not None] for v in variants}
    means = {v: xs for v, xs in means.items() if xs}
    if len(means) > 1:
        m = {v: statistics.mean(xs) for v, xs in means.items()}
        spread = max(m.values()) - min(m.values())
        stds = [statistics.stdev(xs) for xs in means.values() if len(xs) > 1]
        best = max(m, key=m.get)
        lines.append(f"- Highest mean kNN top-1: {VARIANTS[best][1]} ({100 * m[best]:.2f}). Variant means span "
                     f"{100 * spread:.2f} points" + (f"; the seed-to-seed std averages {100 * statistics.mean(stds):.2f} "
                                                      f"points" if stds else "") + ".")
    for v, key, what in (("pos", "pos_mean", "pos mean"), ("both", "pos_mean", "pos mean"),
                         ("neg", "neg_var", "neg variance"), ("both", "neg_var", "neg variance")):
        rs = [r for r in results if r.variant == v]
        used, raw = _score_mean(rs, f"ft_{key}"), _score_mean(rs, f"raw_{key}")
        if used is not None and raw is not None:
            rel = "lower" if used < raw else "not lower"
            lines.append(f"- {VARIANTS[v][1]}: the {what} of the scores the loss used is {rel} than on the "
                         f"untransformed features ({used:.4f} vs {raw:.4f}, last epoch).")
    return "\n".join(lines)


def markdown(results: list[RunResult], args: argparse.Namespace, command: str, wall: float, figures: Path) -> str:
    seeds = list(args.seeds)
    head = ("| variant | config | " + " | ".join(f"kNN top-1 seed {s}" for s in seeds)
            + " | mean ± std | pos mean: used / untransformed | neg var: used / untransformed |")
    rule = "|" + "---|" * (head.count("|") - 1)
    rows = []
    for v in args.variants:
        rs = [r for r in results if r.variant == v]
        by_seed = {r.seed: r for r in rs}
        knns = [r.knn_top1 for r in rs if r.knn_top1 is not None]
        rows.append(f"| {VARIANTS[v][1]} | `{Path(args.configs) / VARIANTS[v][0]}` | "
                    + " | ".join(_pct(by_seed[s].knn_top1) for s in seeds)
                    + f" | {_mean_std(knns)} | {_pair(rs, 'pos_mean', 3)} | {_pair(rs, 'neg_var', 4)} |")
    inits = {r.seed: r.knn_init_top1 for r in results if r.knn_init_top1 is not None}
    init_text = ", ".join(f"seed {s}: {_pct(v)}" for s, v in sorted(inits.items())) or "-"
    trained = [r.seconds for r in results if r.seconds is not None]
    reused = sum(r.reused for r in results)
    timing = (f"training took {sum(trained) / 60:.1f} min in all, {statistics.mean(trained) / 60:.1f} min per run"
              if trained else "training times were not recorded")
    timing += f"; this invocation took {wall / 60:.1f} min" + (f" ({reused} runs reused from an earlier one)"
                                                               if reused else "")
    example = shlex.join(["python", *train_command(Path(args.configs) / VARIANTS[args.variants[-1]][0],
                                                   Path(args.out) / f"{args.variants[-1]}_s{seeds[0]}", seeds[0],
                                                   args.epochs, args.overrides)[1:]])
    return f"""# Ablation: Feature Transformation on the built-in digits (CPU)

Produced by this command, run from the repository root (`make ablation` runs it with the defaults):

    {command}

{len(results)} runs ({len(args.variants)} variants x {len(seeds)} seeds), trained one after another, each as

    {example}

(with that variant's config, seed and folder). Budget: {args.epochs} epochs of the built-in digits (1,437 train /
360 val 16x16 images, ResNet-18 small stem, MLP head, batch 64, queue 1,024, T 0.2, momentum 0.99), kNN (k 200,
T 0.07) on the val split after the last epoch. Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
on {platform.machine()} Linux, {os.cpu_count()} CPU cores (shared with other work), torch fp32;
{timing}.

kNN top-1 in percent. The last two columns are score statistics of the last epoch (batch means, see
`fastft/score_stats.py`, averaged over seeds): on the scores the loss used (after FT) and on the untransformed
features of the same step (q . k, q . stored queue).

{head}
{rule}
{chr(10).join(rows)}

kNN top-1 of the same encoder at random initialisation: {init_text}.

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
    ap.add_argument("--epochs", type=int, default=5, help="pretraining epochs of every run (default 5)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1)")
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
        results = []
        for seed in args.seeds:
            for v in args.variants:
                results.append(run_one(v, seed, args))
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
