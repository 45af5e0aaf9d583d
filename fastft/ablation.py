"""`python -m fastft.ablation [--config NAME] [--nproc-per-node N] [--epochs E] [--seeds S ...] [key.sub=value ...]`
(also `make ablation`).

Trains a config (default: demo, the built-in scenes on the CPU) as MoCo v2, + positive extrapolation, + negative
interpolation and + both (the full Feature Transformation): the config itself with only ft.pos / ft.neg set (its
other ft keys apply to every variant), one run per variant and seed, one after another, each followed by the
config's linear probe (and, once per seed, the same probe of the encoder at random initialisation). Every step is
its own fastft-train or fastft-linear process, under torchrun with N processes when --nproc-per-node N is above 1,
so an interrupted ablation started again resumes each run and probe on its own and reuses what finished. Then
draws all runs side by side with fastft-viz and writes the kNN and linear top-1 table with score statistics, and
the command that produced it, to the section of a markdown file (ABLATION.md) that belongs to this config and
dataset: other sections and anything else in the file stay as they were.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt_io
from .config import ConfigError, find_config, load_config, packaged_configs
from .atomic import write_json, write_text
from .metrics import read_metrics, run_results
from .score_stats import COLLAPSED_NEG_VAR, ScoresError, read_scores

RUN_FILE = "ablation_run.json"  # per run: the command that trained it, how it was launched and how long it took
SECTION_END = "<!-- /ablation -->"  # closes each config's and dataset's section of the table file
# What a table file starts with when the ablation creates it (an existing file keeps its own beginning).
FILE_HEAD = ("# Ablation: Feature Transformation\n\nOne section per config and dataset, each written by "
             "`python -m fastft.ablation`, which rewrites only its own.\n")


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]  # set on top of the config (and before the command line's overrides)


VARIANTS = {
    "mocov2": Variant("MoCo v2", ("ft.pos=none", "ft.neg=none")),
    "pos": Variant("+ pos extrapolation", ("ft.pos=extrapolate", "ft.neg=none")),
    "neg": Variant("+ neg interpolation", ("ft.pos=none", "ft.neg=interpolate")),
    "both": Variant("+ both (full FT)", ("ft.pos=extrapolate", "ft.neg=interpolate")),
    # The authors' one-sided per-element variants (DTennant/CL-Visualizing-Feature-Transformation at c53d1be,
    # memory/mem_moco.py:168-182 and 221-232, `--mixnorm --mixnorm_target pos / neg` with the --beta_alpha
    # default 2.0): --variants to add them.
    "pos_elementwise": Variant("+ pos extrapolation, per element",
                               ("ft.pos=extrapolate", "ft.neg=none", "ft.dim_mask=pos", "ft.alpha_pos=2.0")),
    "neg_elementwise": Variant("+ neg interpolation, per element",
                               ("ft.pos=none", "ft.neg=interpolate", "ft.dim_mask=neg", "ft.alpha_neg=2.0")),
}
DEFAULT_VARIANTS = ["mocov2", "pos", "neg", "both"]
# Keys the ablation sets for each run, and the option that sets them instead of an override.
PER_RUN_KEYS = {"run.out_dir": "--out", "run.seed": "--seeds", "optim.epochs": "--epochs"}


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


def launcher(nproc: int) -> list[str]:
    """How every run and probe starts: one plain process, or torchrun's `nproc` workers on this machine
    (--standalone: a rendezvous of its own on a free port, so ablations side by side never meet)."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def run_overrides(variant: str, run_dir: Path, seed: int, args: argparse.Namespace, baselines: bool) -> list[str]:
    """The overrides of one run (its probe takes the same): the variant's, then the ablation's per-run keys, then
    the command line's, last so they win (e.g. knn.pixels=false where the pixels are too many to compare).
    `baselines`: also kNN the random-init encoder, and the pixels if the config does (the first variant of each
    seed: the other variants of that seed start from the same network)."""
    return [*VARIANTS[variant].overrides, f"run.out_dir={run_dir}", f"run.seed={seed}", f"optim.epochs={args.epochs}",
            f"knn.every={args.epochs}", f"knn.random_init={str(baselines).lower()}",
            *([] if baselines else ["knn.pixels=false"]), "run.progress=false", "scores.untransformed=true",
            *args.overrides]


def train_command(overrides: list[str], args: argparse.Namespace) -> list[str]:
    """fastft-train for one run."""
    return [*launcher(args.nproc_per_node), "-m", "fastft.train", args.config, *overrides]


def probe_command(overrides: list[str], args: argparse.Namespace, random_init: bool) -> list[str]:
    """fastft-linear on the run those overrides trained (its newest checkpoint), with the config's probe."""
    return [*launcher(args.nproc_per_node), "-m", "fastft.linear", args.config, *overrides,
            *(["--compare-random-init"] if random_init else [])]


def shown(cmd: list[str]) -> str:
    """A command as the table shows it: `python` for this interpreter's path."""
    return shlex.join(["python", *cmd[1:]])


def finished_with_same_config(args: argparse.Namespace, overrides: list[str], run_dir: Path) -> bool:
    """Whether `run_dir` already holds this exact run, finished (so it is not trained again)."""
    if final_knn(read_metrics(run_dir), args.epochs) is None or not (run_dir / "config.yaml").is_file():
        return False
    wanted = load_config(args.config, overrides).to_dict()
    ckpt_io.check_compatible(yaml.safe_load((run_dir / "config.yaml").read_text()), wanted, run_dir / "config.yaml")
    if (run_dir / RUN_FILE).is_file():  # the table says how every run was launched: it must be true of this one
        nproc = json.loads((run_dir / RUN_FILE).read_text()).get("nproc_per_node", 1)
        if nproc != args.nproc_per_node:
            raise RuntimeError(f"{run_dir} was trained with {nproc} process(es), this ablation asks for "
                               f"{args.nproc_per_node}: pass --nproc-per-node {nproc} or another --out")
    return True


def run_logged(cmd: list[str], run_dir: Path, threads: int, what: str) -> None:
    """Run `cmd` with its output appended to run_dir/train.log; a failure raises with the log's last lines."""
    env = dict(os.environ)
    if threads:  # torch reads these when it starts: its CPU threads for the run
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(run_dir / "train.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join((run_dir / "train.log").read_text().splitlines()[-15:])
        raise RuntimeError(f"{what} for {run_dir} failed (exit {proc.returncode}); end of "
                           f"{run_dir / 'train.log'}:\n{tail}")


def run_one(variant: str, seed: int, args: argparse.Namespace, baselines: bool) -> RunResult:
    """Train one variant with one seed (unless finished earlier), probe it (fastft-linear reuses a finished
    probe), and collect its numbers; `baselines` also measures the random-init encoder of this seed (kNN and
    probe) and the pixels."""
    run_dir = Path(args.out) / f"{variant}_s{seed}"
    overrides = run_overrides(variant, run_dir, seed, args, baselines)
    cmd = train_command(overrides, args)
    res = RunResult(variant, seed, run_dir)
    t0 = time.perf_counter()
    if finished_with_same_config(args, overrides, run_dir):
        print(f"  {run_dir}: already trained, reusing it", flush=True)
        res.reused = True
        if (run_dir / RUN_FILE).is_file():
            res.seconds = json.loads((run_dir / RUN_FILE).read_text()).get("seconds")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"  {run_dir}: {shown(cmd)}", flush=True)
        run_logged(cmd, run_dir, args.threads, "fastft-train")
    probe = probe_command(overrides, args, baselines)
    run_logged(probe, run_dir, args.threads, "fastft-linear")
    if not res.reused:
        res.seconds = time.perf_counter() - t0
        write_json(run_dir / RUN_FILE, {"command": shown(cmd), "probe": shown(probe), "seconds": res.seconds,
                                        "threads": args.threads or None, "nproc_per_node": args.nproc_per_node},
                   indent=None)
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
                lines.append(f"- {VARIANTS[v].label}: mean {what} top-1 {100 * (statistics.mean(xs) - init):+.2f} "
                             f"points against the same encoders at random initialisation ({100 * init:.2f}).")
    if (pixels := _baseline(results, "knn_pixels_top1")) is not None:
        best = max((statistics.mean(xs), v) for v in variants if (xs := _values(results, v, "knn_top1")))
        lines.append(f"- Raw pixels give kNN top-1 {100 * pixels:.2f}; the best variant ({VARIANTS[best[1]].label}) is "
                     f"{100 * (best[0] - pixels):+.2f} points from them.")
    for v in variants:
        rs = [r for r in results if r.variant == v]
        down = [r for r in rs if collapsed(r)]
        if down:
            r = down[0]
            lines.append(f"- {VARIANTS[v].label}: the projection collapsed in {len(down)} of {len(rs)} runs (last "
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
            lines.append(f"- Highest mean {what} top-1: {VARIANTS[best].label} ({100 * m[best]:.2f}). Variant means "
                         f"span {100 * (max(m.values()) - min(m.values())):.2f} points"
                         + (f"; the seed-to-seed std averages {100 * statistics.mean(stds):.2f} points" if stds else "")
                         + ".")
    for v, key, what in (("pos", "pos_mean", "pos mean"), ("both", "pos_mean", "pos mean"),
                         ("neg", "neg_var", "neg variance"), ("both", "neg_var", "neg variance")):
        rs = [r for r in results if r.variant == v]
        used, raw = _score_mean(rs, f"ft_{key}"), _score_mean(rs, f"raw_{key}")
        if used is not None and raw is not None:
            rel = "lower" if used < raw else "not lower"
            lines.append(f"- {VARIANTS[v].label}: the {what} of the scores the loss used is {rel} than on the "
                         f"untransformed features ({used:.4f} vs {raw:.4f}, last epoch).")
    return "\n".join(lines)


def _per_seed(by_seed: dict[int, RunResult], seeds: list[int], attr: str) -> str:
    return " / ".join(_pct(getattr(by_seed[s], attr)) if s in by_seed else "-" for s in seeds)


def recipe(config: dict, nproc: int) -> str:
    """The budget the runs shared, read from a run's config.yaml."""
    d, lo, m, o = config["data"], config["loader"], config["model"], config["optim"]
    return (f"`{d['path']}` at {d['image_size']}x{d['image_size']}, {m['arch']}"
            + (" small stem" if m["small_stem"] else "") + f", {m['head']} head, batch {lo['batch_size']}x{nproc}, "
            f"queue {m['queue_size']}, T {m['temperature']}, momentum {m['momentum']}, lr {o['lr']} per "
            f"{o['lr_batch']} images, {o['warmup_epochs']} warm-up epoch(s), {o['epochs']} epochs")


def machine(config: dict, nproc: int) -> str:
    """Where the runs ran: the host, and the GPU where they ran on one."""
    where = f"{platform.machine()} Linux, {os.cpu_count()} CPU cores"
    if config["run"]["device"] != "cpu" and torch.cuda.is_available():
        where += f", {torch.cuda.get_device_name(0)}"
    return f"{where}, {nproc} process(es) per run, run.precision {config['run']['precision']}"


def markdown(results: list[RunResult], args: argparse.Namespace, command: str, wall: float, figures: Path) -> str:
    """The section of one config on one dataset: how it was produced, the table, what it shows."""
    seeds = list(args.seeds)
    seed_list = " / ".join(str(s) for s in seeds)
    head = (f"| variant | overrides | kNN top-1 (seeds {seed_list}) | kNN mean ± std | linear top-1 (seeds "
            f"{seed_list}) | linear mean ± std | pos mean: used / untransformed | neg var: used / untransformed |")
    rule = "|" + "---|" * (head.count("|") - 1)
    rows = []
    for v in args.variants:
        rs = [r for r in results if r.variant == v]
        by_seed = {r.seed: r for r in rs}
        rows.append(f"| {VARIANTS[v].label} | `{' '.join(VARIANTS[v].overrides)}` | "
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
    # The last run's own commands, as they ran (the baselines are the first variant's).
    last = run_overrides(args.variants[-1], results[-1].run_dir, results[-1].seed, args, len(args.variants) == 1)
    config = yaml.safe_load((results[-1].run_dir / "config.yaml").read_text())
    probe = f"linear probe of {config['linear']['epochs']} epochs on " + (
        "cached features" if config["linear"]["cache_features"] else "augmented views")
    return f"""## {args.name} on `{config['data']['path']}`

Produced by this command, run from the repository root:

    {command}

{len(results)} runs ({len(args.variants)} variants x {len(seeds)} seeds), trained one after another; the last as

    {shown(train_command(last, args))}

then probed as

    {shown(probe_command(last, args, False))}

(the others with their variant's overrides, seed and folder; the first variant of each seed measures the baselines:
`knn.random_init=true`, the config's `knn.pixels`, and `--compare-random-init` on its probe).
Recipe: {recipe(config, args.nproc_per_node)}; kNN (k {config['knn']['k']}, T {config['knn']['temperature']}) on the
val split after the last epoch; {probe}. Written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on
{machine(config, args.nproc_per_node)}; {timing}.

Top-1 on the val split in percent. The last two columns are score statistics of the last epoch (batch means, see
`fastft/score_stats.py`, averaged over seeds): on the scores the loss used (after FT) and on the untransformed
features of the same step (q . k, q . stored queue).

{head}
{rule}
{chr(10).join(rows)}

{observations(results, list(args.variants))}

Figures (`fastft-viz` over all runs; not committed): `{figures}`.
"""


def section_marker(name: str, data_path: str) -> str:
    """The line that opens the section of config `name` on `data_path`: what a later ablation finds it by."""
    return f"<!-- ablation: {name} {data_path} -->"


def with_section(old: str, marker: str, body: str) -> str:
    """`old` (a table file's text) with the section that `marker` opens replaced by `body`, or `body` added at the
    end where it has none yet; everything outside that section is kept byte for byte (so a file from before the
    sections keeps its text above them)."""
    block = f"{marker}\n{body.strip()}\n{SECTION_END}\n"
    found = re.search(rf"^{re.escape(marker)}$", old, re.M)
    if found is None:
        if not old:
            return f"{FILE_HEAD}\n{block}"
        return old + ("\n" if old.endswith("\n") else "\n\n") + block  # after a blank line
    end = old.find(f"\n{SECTION_END}", found.end())
    other = old.find("\n<!-- ablation: ", found.end())
    if end < 0 or 0 <= other < end:  # rewriting up to another section's end would drop that section
        raise RuntimeError(f"{marker} has no {SECTION_END} before the next section: mend the file by hand")
    end += len(SECTION_END) + 1
    return old[:found.start()] + block + old[end + (old[end:end + 1] == "\n"):]


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace (or add) one section of the table file, atomically: the file is whole, old or new, at every moment."""
    write_text(path, with_section(path.read_text() if path.is_file() else "", marker, body))


def draw_figures(results: list[RunResult], out: Path) -> Path:
    """fastft-viz over all runs (as its own process: nothing imports an entry point)."""
    cmd = [sys.executable, "-m", "fastft.viz", *[str(r.run_dir) for r in results], "--out", str(out),
           "--labels", *[f"{r.variant}_s{r.seed}" for r in results]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd[1:])} failed: {proc.stderr.strip()}")
    return out / "index.html"


def config_name(config: str) -> str:
    """How the table names the config: its packaged name (`demo`, `in100`) however it was given, else the path."""
    path = find_config(config).resolve()
    return next((name for name, p in packaged_configs().items() if p.resolve() == path), str(config))


def default_out(name: str, data_path: str) -> Path:
    """runs/ablation/CONFIG-DATASET (e.g. runs/ablation/demo-scenes): datasets and configs never share run folders
    (two datasets in folders of the same name do: give them --out each)."""
    slug = lambda text: re.sub(r"[^A-Za-z0-9._-]+", "_", Path(text).name) or "data"
    return Path("runs/ablation") / f"{slug(name.removesuffix('.yaml'))}-{slug(data_path.removeprefix('builtin:'))}"


def check_overrides(overrides: list[str], variants: list[str]) -> None:
    """The keys the ablation sets for each run cannot come from the command line as well: every variant would
    train the same thing, or every run into one folder."""
    owned = {**PER_RUN_KEYS, **{o.partition("=")[0]: "--variants" for v in variants for o in VARIANTS[v].overrides}}
    for text in overrides:
        key = text.partition("=")[0].strip()
        if key in owned:
            raise ConfigError(f"override {text!r}: the ablation sets {key} for each run ({owned[key]}); drop it")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fastft.ablation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*",
                    help="extra key.sub=value overrides for every run (before the options, or after --)")
    ap.add_argument("--config", default="demo",
                    help="the config every variant starts from: a YAML file or a packaged config's name (default: "
                         "demo; fastft-train --list-configs)")
    ap.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                    help="processes per run and probe: above 1, each is launched with torchrun --standalone "
                         "--nproc_per_node N (default 1: plain processes)")
    ap.add_argument("--epochs", type=int, help="pretraining epochs of every run (default: the config's optim.epochs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                    help=f"which variants to train (default: {' '.join(DEFAULT_VARIANTS)})")
    ap.add_argument("--out", help="folder for the runs, one sub-folder each (default: runs/ablation/CONFIG-DATASET, "
                                  "e.g. runs/ablation/demo-scenes)")
    ap.add_argument("--table", default="ABLATION.md",
                    help="markdown file for the table: its section for this config and dataset is written, the rest "
                         "of the file kept (default: ABLATION.md)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads per process (default: torch's choice, 1 under torchrun; 1 is faster on "
                         "oversubscribed cores)")
    args = ap.parse_args(argv)
    if args.nproc_per_node < 1:
        ap.error(f"--nproc-per-node {args.nproc_per_node}: at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "fastft.ablation", *argv])
    t0 = time.perf_counter()
    try:
        # Every variant's config loads (and the overrides are checked) before anything trains.
        configs = [load_config(args.config, [*VARIANTS[v].overrides, *args.overrides]) for v in args.variants]
        check_overrides(args.overrides, args.variants)
        cfg = configs[0]  # the variants differ in ft.* only
        args.name = config_name(args.config)
        if args.epochs is None:
            args.epochs = cfg.optim.epochs
        args.out = args.out or default_out(args.name, cfg.data.path)
        results = []
        for seed in args.seeds:
            for i, v in enumerate(args.variants):
                results.append(run_one(v, seed, args, baselines=i == 0))
        index = draw_figures(results, Path(args.out) / "viz")
        marker = section_marker(args.name, cfg.data.path)
        write_section(Path(args.table), marker, markdown(results, args, command, time.perf_counter() - t0, index))
    except (ConfigError, ckpt_io.CheckpointError, RuntimeError) as e:
        print(f"python -m fastft.ablation: error: {e}", file=sys.stderr)
        return 2
    print(f"python -m fastft.ablation: table in {args.table} ({marker}), figures in {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
