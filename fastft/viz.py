"""`fastft-viz RUN [RUN ...] --out DIR`: the paper's pos/neg score figures from one or more runs.

Draws, from each run's `scores/` folder and metrics.jsonl:
  curves        pos mean, neg mean, neg variance, exp(pos/T), mean exp(neg/T) and the training loss against the
                iteration (epochs on the top axis), runs overlaid, each run's final accuracy in the legend
  ft_effect     the score curves on the features used in the loss (solid) and on the untransformed ones (dashed)
  density_*     per run: the evolving pos and neg score distributions, density over score x iteration
  epochs_*      per run: one pos and one neg density curve per epoch
  final         the last epoch's pos and neg densities of all runs overlaid
  sweep         with --sweep: the paper's stacked 3D curves, one per run, stacked along the one config key
                the runs differ in (their notebook's momentum figure)
each as PNG and SVG, and `index.html` showing them all with a table of every run's accuracies against its
baselines (random init, raw pixels) and every run's config.yaml.
"""
from __future__ import annotations

import html
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # files only, never a window (headless machines, CI)

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from matplotlib import cm, colors, ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from . import cli  # noqa: E402
from .atomic import write_text  # noqa: E402
from .metrics import RESULTS, read_metrics, run_results  # noqa: E402
from .score_stats import BinSpec, RunScores, ScoresError, read_scores  # noqa: E402

# Every logged score series: (series key, panel title, y-axis label, log scale). The first three are the paper's.
CURVES = (("pos_mean", "pos score mean", "mean of q\u0302\u00b7k\u0302", False),
          ("neg_mean", "neg score mean", "mean of q\u0302\u00b7n", False),
          ("neg_var", "neg score variance", "variance of q\u0302\u00b7n over K (unbiased)", False),
          ("exp_pos_mean", "exp(pos / T)", "batch mean of exp(q\u0302\u00b7k\u0302 / T)", True),
          ("exp_neg_mean", "mean exp(neg / T)", "batch mean of mean over K of exp(q\u0302\u00b7n / T)", True))
# The paper's stacked 3D figure, one panel per statistic.
SWEEP_CURVES = CURVES[:3]
# Results of a run and its baselines, in the order of the run table; the first two also go in the legend.
KINDS = (("pos", "pos scores"), ("neg", "neg scores"))
FEATURE_NAMES = {"ft": "used in the loss (after FT)", "raw": "untransformed (q, k, stored queue)"}
RC = {"svg.fonttype": "none", "svg.hashsalt": "fastft", "font.size": 9}  # text stays text in SVGs; stable ids


class VizError(ValueError):
    """A run folder that cannot be drawn, with the reason."""


@dataclass
class Run:
    label: str
    slug: str
    scores: RunScores
    results: dict[str, float]  # RESULTS keys this run recorded
    config_text: str | None
    loss: tuple[np.ndarray, np.ndarray]  # (steps, training loss) from metrics.jsonl; empty if not logged

    @property
    def accuracy(self) -> str:
        """"linear 93.0%, kNN 91.2%" / "": the trained encoder's results, for legends."""
        return ", ".join(f"{k} {self.results[k]:.1%}" for k in ("linear", "kNN") if k in self.results)

    def config(self) -> dict:
        try:
            cfg = yaml.safe_load(self.config_text) if self.config_text else None
        except yaml.YAMLError:
            cfg = None
        return cfg if isinstance(cfg, dict) else {}


# -- inputs ---------------------------------------------------------------------------------------------------
def training_loss(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, loss) of the per-step training records."""
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and isinstance(r.get("loss"), float)]
    steps, loss = zip(*train) if train else ((), ())
    return np.asarray(steps, dtype=np.int64), np.asarray(loss, dtype=np.float64)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _labels(paths: list[Path], given: list[str] | None) -> list[str]:
    """Folder names, or enough trailing path parts to tell runs apart."""
    if given:
        if len(given) != len(paths):
            raise VizError(f"--labels has {len(given)} names for {len(paths)} runs")
        return list(given)
    for depth in range(1, 1 + max(len(p.resolve().parts) for p in paths)):
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def load_runs(paths: list[str | Path], labels: list[str] | None = None) -> list[Run]:
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_dir():
            raise VizError(f"run folder {p} does not exist" if not p.exists() else
                           f"{p} is not a folder; expected a run folder (run.out_dir) holding scores/")
    runs = []
    names = _labels(paths, labels)
    for p, name in zip(paths, names):
        try:
            scores = read_scores(p)
        except ScoresError as e:
            raise VizError(str(e)) from None
        records = read_metrics(p)
        cfg = p / "config.yaml"
        runs.append(Run(name, f"{len(runs)}_{_slug(name)}", scores, run_results(p, records),
                        cfg.read_text() if cfg.is_file() else None, training_loss(records)))
    first = runs[0]
    for r in runs[1:]:
        if r.scores.bins_key() != first.scores.bins_key():
            raise VizError(
                f"{r.scores.run_dir} and {first.scores.run_dir} logged scores with different bins "
                f"({r.scores.run_dir}: pos {r.scores.pos_bins.describe()}, neg {r.scores.neg_bins.describe()}; "
                f"{first.scores.run_dir}: pos {first.scores.pos_bins.describe()}, neg {first.scores.neg_bins.describe()}): "
                f"their distributions cannot share axes. Draw them in separate fastft-viz calls, or train with the "
                f"same scores.bins / scores.pos_lo / pos_hi / neg_lo / neg_hi")
    return runs


# -- helpers --------------------------------------------------------------------------------------------------
def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that skips NaNs (steps a chunk did not log) and shrinks at the ends."""
    if window <= 1:
        return values
    ok = np.isfinite(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / count
    out[~ok] = np.nan
    return out


def auto_window(n_steps: int) -> int:
    return max(1, int(round(n_steps / 60)))


def density(counts: np.ndarray, bins: BinSpec) -> np.ndarray:
    """Counts [..., nbins] -> probability density per unit score (each row integrates to 1)."""
    total = counts.sum(axis=-1, keepdims=True).astype(float)
    width = (bins.hi - bins.lo) / bins.n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, counts / np.maximum(total, 1) / width, 0.0)


def occupied_range(counts: np.ndarray, bins: BinSpec, mass: float = 0.001) -> tuple[float, float]:
    """Score range holding all but `mass` of the pooled counts on each side, padded by a few bins."""
    pooled = counts.reshape(-1, bins.n).sum(0).astype(float)
    if pooled.sum() == 0:
        return bins.lo, bins.hi
    cdf = np.cumsum(pooled) / pooled.sum()
    lo_i = int(np.searchsorted(cdf, mass))
    hi_i = int(np.searchsorted(cdf, 1 - mass)) + 1
    pad = max(2, (hi_i - lo_i) // 10)
    edges = bins.edges()
    return float(edges[max(0, lo_i - pad)]), float(edges[min(bins.n, hi_i + pad)])


def epoch_hists(s: RunScores, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs [E], counts [E, nbins]): the chunks of each epoch summed (chunks are flushed at epoch ends)."""
    epochs = np.unique(s.chunk_epoch)
    return epochs, np.stack([s.hists[key][s.chunk_epoch == e].sum(0) for e in epochs])


def _legend_label(run: Run) -> str:
    return f"{run.label} ({run.accuracy})" if run.accuracy else run.label


def _palette(n: int) -> list:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Figure, out: Path, name: str) -> list[str]:
    files = []
    with matplotlib.rc_context(RC):
        for ext in ("png", "svg"):
            path = out / f"{name}.{ext}"
            fig.savefig(path, dpi=110, metadata={"Date": None} if ext == "svg" else None)
            files.append(path.name)
    return files


# -- figures --------------------------------------------------------------------------------------------------
def _kind(key: str) -> str:
    """Which scores a series is made of: "pos" or "neg"."""
    return "pos" if key.startswith(("pos", "exp_pos")) else "neg"


def _same_as_ft(s: RunScores, feature: str, kind: str) -> bool:
    """The untransformed `kind` scores of a run whose FT leaves them alone (ft.pos or ft.neg none) are the very
    scores used in the loss: drawing them again would only duplicate a panel."""
    return feature == "raw" and not s.transformed[kind]


def add_epoch_axis(ax, s: RunScores) -> None:
    """Epochs on the top axis, from the run's step -> epoch record (epoch e ends at its last logged step)."""
    epochs = np.unique(s.epochs)
    ends = np.array([0] + [int(s.steps[s.epochs == e].max()) for e in epochs], dtype=float)
    marks = np.concatenate([[0], epochs + 1]).astype(float)
    if len(ends) < 2 or np.any(np.diff(ends) <= 0):
        return
    top = ax.secondary_xaxis("top", functions=(lambda x: np.interp(x, ends, marks),
                                               lambda e: np.interp(e, marks, ends)))
    top.set_xlabel("epoch", fontsize=8)
    top.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, nbins=6))
    top.tick_params(labelsize=7)


def _style_axis(ax, title: str, ylabel: str, log: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel, fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def curves_figure(runs: list[Run], window: int, feature_styles: dict[str, str], with_loss: bool = True) -> Figure:
    """Every score series (and the training loss) vs iteration; one line per run (and per feature in
    `feature_styles`), epochs of the first run on the top axis."""
    panels = len(CURVES) + with_loss
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(13, 7.6), layout="constrained")
        axes = fig.subplots(2, (panels + 1) // 2).ravel()
        for ax in axes[panels:]:
            ax.set_axis_off()
        for run, color in zip(runs, _palette(len(runs))):
            s = run.scores
            w = window or auto_window(len(s.steps))
            for feat, style in feature_styles.items():
                if not s.has(feat):
                    continue
                for ax, (key, *_) in zip(axes, CURVES):
                    if _same_as_ft(s, feat, _kind(key)):
                        continue
                    line, = ax.plot(s.steps, smooth(s.series[f"{feat}_{key}"], w), style, color=color, lw=1.4,
                                    label=_legend_label(run) if feat == "ft" else None)
                    line.set_gid(f"series:{key}:{run.slug}:{feat}")
            if with_loss and len(run.loss[0]):
                line, = axes[len(CURVES)].plot(run.loss[0], smooth(run.loss[1], auto_window(len(run.loss[0]))),
                                               color=color, lw=1.4)
                line.set_gid(f"series:loss:{run.slug}")
        for ax, (_, title, ylabel, log) in zip(axes, CURVES):
            _style_axis(ax, title, ylabel, log)
        if with_loss:
            _style_axis(axes[len(CURVES)], "training loss", "InfoNCE loss (nats)", False)
        for ax in axes[:panels]:
            add_epoch_axis(ax, runs[0].scores)
        handles, labels = axes[0].get_legend_handles_labels()
        if len(feature_styles) > 1:
            from matplotlib.lines import Line2D
            for feat, style in feature_styles.items():
                handles.append(Line2D([], [], color="0.3", linestyle=style))
                labels.append(FEATURE_NAMES[feat])
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), frameon=False)
    return fig


def _panels(run: Run, draw: Callable[[Figure, object, str, str, BinSpec], None]) -> Figure:
    """A figure with a row per logged feature (after FT, untransformed) and a column per kind (pos, neg):
    draw(fig, ax, feature, kind, bins) fills each panel; an untransformed panel equal to the one above is left
    out, with a note saying why."""
    s = run.scores
    feats = [f for f in ("ft", "raw") if s.has(f)]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(12, 3.4 * len(feats)), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(feats), 2, squeeze=False))
        for row, feat in enumerate(feats):
            for col, (kind, title) in enumerate(KINDS):
                ax = axes[row, col]
                if _same_as_ft(s, feat, kind):
                    ax.set_axis_off()
                    ax.text(0.5, 0.5, f"untransformed {kind} scores = those used in the loss\n"
                            f"(ft.{kind}: none, FT leaves them alone): drawn above",
                            ha="center", va="center", transform=ax.transAxes, color="0.4")
                    continue
                draw(fig, ax, feat, kind, s.pos_bins if kind == "pos" else s.neg_bins)
                ax.set_title(f"{title}: {FEATURE_NAMES[feat]}")
        fig.suptitle(_legend_label(run))
    return fig


def density_figure(run: Run) -> Figure:
    """Density over score x iteration (each column one chunk, normalised), with the mean drawn on top."""
    s = run.scores
    x = np.concatenate([[s.chunk_first[0] - 1], s.chunk_last]).astype(float)

    def draw(fig: Figure, ax, feat: str, kind: str, bins: BinSpec) -> None:
        counts = s.hists[f"{feat}_{kind}"]
        d = np.ma.masked_less_equal(density(counts, bins), 0)
        cmap = matplotlib.colormaps["magma"]
        cmap = cmap.with_extremes(bad=cmap(0))  # empty bins: the colour of the lowest density
        vmax = float(d.max()) if d.count() else 1.0
        mesh = ax.pcolormesh(x, bins.edges(), d.T, cmap=cmap, shading="flat",
                             norm=colors.LogNorm(vmin=vmax * 1e-3, vmax=vmax), rasterized=True)
        mesh.set_gid(f"density:{feat}:{kind}")
        mean = s.series[f"{feat}_{kind}_mean"]
        line, = ax.plot(s.steps, smooth(mean, auto_window(len(s.steps))), color="cyan", lw=1.0, label="batch mean")
        line.set_gid(f"mean:{feat}:{kind}")
        ax.set_ylim(*occupied_range(counts, bins))
        ax.set_xlabel("iteration")
        ax.set_ylabel("score")
        add_epoch_axis(ax, s)
        ax.legend(loc="upper right", fontsize=7)
        fig.colorbar(mesh, ax=ax, label="density")

    return _panels(run, draw)


def epochs_figure(run: Run) -> Figure:
    """One density curve per epoch, coloured from the first epoch (dark) to the last (yellow)."""
    def draw(fig: Figure, ax, feat: str, kind: str, bins: BinSpec) -> None:
        epochs, counts = epoch_hists(run.scores, f"{feat}_{kind}")
        norm = colors.Normalize(vmin=1, vmax=max(2, int(epochs.max()) + 1))
        centres = (bins.edges()[:-1] + bins.edges()[1:]) / 2
        for e, dens in zip(epochs, density(counts, bins)):
            line, = ax.plot(centres, dens, color=cm.viridis(norm(e + 1)), lw=1.1)
            line.set_gid(f"epoch:{feat}:{kind}:{int(e) + 1}")
        ax.set_xlim(*occupied_range(counts, bins))
        ax.set_xlabel("score")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="epoch")
        bar.locator = ticker.MaxNLocator(integer=True)
        bar.update_ticks()

    return _panels(run, draw)


def final_figure(runs: list[Run]) -> Figure:
    """The last logged epoch's pos and neg densities of every run, overlaid."""
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(12, 3.8), layout="constrained")
        axes = fig.subplots(1, 2)
        for col, (kind, title) in enumerate(KINDS):
            ax = axes[col]
            bins = runs[0].scores.pos_bins if kind == "pos" else runs[0].scores.neg_bins
            centres = (bins.edges()[:-1] + bins.edges()[1:]) / 2
            pooled = []
            for run, color in zip(runs, _palette(len(runs))):
                epochs, counts = epoch_hists(run.scores, f"ft_{kind}")
                pooled.append(counts[-1])
                line, = ax.plot(centres, density(counts[-1], bins), color=color, lw=1.3,
                                label=f"{_legend_label(run)}, epoch {int(epochs[-1]) + 1}")
                line.set_gid(f"final:{kind}:{run.slug}")
            ax.set_xlim(*occupied_range(np.stack(pooled), bins))
            ax.set_title(f"{title}, last epoch (used in the loss)")
            ax.set_xlabel("score")
            ax.set_ylabel("density")
            ax.grid(alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), frameon=False)
    return fig


# -- sweeps ---------------------------------------------------------------------------------------------------
# Keys that say where and how a run reports, not what it learns: never the swept key.
BOOKKEEPING = ("run.out_dir", "run.resume", "run.log_every", "run.ckpt_every", "run.keep_ckpts",
               "run.epochs_per_job", "run.progress", "run.tensorboard", "data.cache_dir")


def flatten(cfg: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"momentum": 0.99}} -> {"model.momentum": 0.99}."""
    out: dict[str, object] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _sort_key(value: object) -> tuple:
    return (0, float(value), "") if isinstance(value, (int, float)) else (1, 0.0, str(value))


def sweep_key(runs: list[Run], key: str | None = None) -> tuple[str, list[object]]:
    """The one config key the runs differ in (or `key`), and each run's value of it."""
    configs = []
    for r in runs:
        if not r.config_text:
            raise VizError(f"{r.scores.run_dir} has no config.yaml: --sweep finds the swept key in the runs' configs")
        configs.append(flatten(r.config()))
    if key is None:
        keys = sorted({k for c in configs for k in c} - set(BOOKKEEPING))
        differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
        if not differ:
            raise VizError(f"the {len(runs)} runs have the same config (apart from {', '.join(BOOKKEEPING[:1])} and "
                           f"other bookkeeping keys): a sweep needs runs that differ in one key")
        if len(differ) > 1:
            raise VizError(f"the runs differ in {len(differ)} config keys ({', '.join(differ)}); name the swept one "
                           f"with --key, e.g. --key {differ[0]}")
        key = differ[0]
    missing = [str(r.scores.run_dir) for r, c in zip(runs, configs) if key not in c]
    if missing:
        raise VizError(f"--key {key}: not a key of the config of {', '.join(missing)}; the keys are dotted paths "
                       f"such as model.momentum")
    return key, [c[key] for c in configs]


def _stacked_axes(fig: Figure, col: int, cols: int, key: str, runs: list[Run]):
    """A 3D panel whose x axis is the sweep: one tick per run, named by its label."""
    ax = fig.add_subplot(1, cols, col + 1, projection="3d")
    ax.set_xticks(range(len(runs)), [run.label for run in runs], fontsize=7)
    ax.set_xlabel(key, labelpad=8)
    return ax


def sweep_figure(runs: list[Run], key: str, window: int) -> Figure:
    """The paper's stacked 3D curves (their notebook): for each statistic, one curve per run against the
    iteration, the runs stacked along the swept key in its order."""
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(15, 5.2), layout="constrained")
        for col, (stat, title, ylabel, _) in enumerate(SWEEP_CURVES):
            ax = _stacked_axes(fig, col, len(SWEEP_CURVES), key, runs)
            for i, (run, color) in enumerate(zip(runs, _palette(len(runs)))):
                s = run.scores
                values = smooth(s.series[f"ft_{stat}"], window or auto_window(len(s.steps)))
                line, = ax.plot(np.full(len(s.steps), i), s.steps, values, color=color, lw=1.3)
                line.set_gid(f"sweep:{stat}:{run.slug}")
            ax.set_ylabel("iteration", labelpad=8)
            ax.set_zlabel(ylabel, fontsize=7, labelpad=8)
            ax.set_title(f"{title} (used in the loss)")
        fig.suptitle(f"Sweep over {key}: " + ", ".join(_legend_label(r) for r in runs), fontsize=9)
    return fig


def sweep_final_figure(runs: list[Run], key: str) -> Figure:
    """The last epoch's pos and neg score densities, stacked along the swept key."""
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(12, 5.2), layout="constrained")
        for col, (kind, title) in enumerate(KINDS):
            ax = _stacked_axes(fig, col, len(KINDS), key, runs)
            bins = runs[0].scores.pos_bins if kind == "pos" else runs[0].scores.neg_bins
            centres = (bins.edges()[:-1] + bins.edges()[1:]) / 2
            last = [epoch_hists(r.scores, f"ft_{kind}")[1][-1] for r in runs]
            lo, hi = occupied_range(np.stack(last), bins)
            shown = (centres >= lo) & (centres <= hi)
            for i, (run, counts, color) in enumerate(zip(runs, last, _palette(len(runs)))):
                line, = ax.plot(np.full(shown.sum(), i), centres[shown], density(counts, bins)[shown], color=color)
                line.set_gid(f"sweep_final:{kind}:{run.slug}")
            ax.set_ylabel("score", labelpad=8)
            ax.set_zlabel("density", labelpad=6)
            ax.set_title(f"{title}, last epoch (used in the loss)")
    return fig


# -- page -----------------------------------------------------------------------------------------------------
def write_index(out: Path, runs: list[Run], figures: list[tuple[str, str, list[str]]]) -> Path:
    """One page with every figure (PNG inline, SVG linked) and every run's config."""
    e = html.escape
    pct = lambda r, k: f"{r.results[k]:.1%}" if k in r.results else "-"
    rows = "\n".join(
        f"<tr><td>{e(r.label)}</td><td><code>{e(str(r.scores.run_dir))}</code></td>"
        + "".join(f"<td>{pct(r, k)}</td>" for k in RESULTS)
        + f"<td>{len(r.scores.steps)}</td><td>{int(r.scores.steps[-1])}</td></tr>" for r in runs)
    heads = "".join(f"<th>{e(k)}</th>" for k in RESULTS)
    figs = "\n".join(
        f'<figure id="{e(name)}"><img src="{e(files[0])}" alt="{e(caption)}">'
        f'<figcaption>{e(caption)} &middot; <a href="{e(files[1])}">SVG</a></figcaption></figure>'
        for name, caption, files in figures)
    configs = "\n".join(
        f"<details><summary>{e(r.label)}: config.yaml</summary><pre>{e(r.config_text or '(no config.yaml in the run folder)')}</pre></details>"
        for r in runs)
    s0 = runs[0].scores
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fastft scores: {e(', '.join(r.label for r in runs))}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em}}
img{{max-width:100%;border:1px solid #ddd}} figure{{margin:1.5em 0}} td,th{{padding:2px 10px;text-align:left}}
pre{{background:#f6f6f6;padding:8px;font-size:12px}}</style></head><body>
<h1>Pos / neg score statistics</h1>
<p>Scores are cosine-like dot products of the features used in the loss (pos: q&#770;&middot;k&#770;, neg:
q&#770;&middot;n), not divided by T ({s0.temperature:g} in the first run). Bins: pos {e(s0.pos_bins.describe())},
neg {e(s0.neg_bins.describe())}.</p>
<p>Top-1 on the validation split: the trained encoder (kNN monitor, linear probe) beside its baselines, the
same architecture at random initialisation and the raw pixels ("-": not measured for that run).</p>
<table><tr><th>run</th><th>folder</th>{heads}<th>steps logged</th><th>last step</th></tr>
{rows}</table>
{figs}
<h2>Run configs</h2>
{configs}
</body></html>
"""
    path = out / "index.html"
    write_text(path, page)
    return path


def draw(paths: list[str | Path], out: str | Path, labels: list[str] | None = None, window: int = 0,
         sweep: bool = False, key: str | None = None) -> Path:
    """Every figure for `paths` into `out` (with `sweep`, first the stacked figures across the runs, ordered by
    the swept config key); returns the index.html path."""
    if not paths:
        raise VizError("no run folders given")
    runs = load_runs(paths, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, list[str]]] = []

    def add(fig: Figure, name: str, caption: str) -> None:
        figures.append((name, caption, _save(fig, out, name)))

    if sweep:
        if len(runs) < 2:
            raise VizError("--sweep needs at least two run folders")
        key, values = sweep_key(runs, key)
        order = sorted(range(len(runs)), key=lambda i: _sort_key(values[i]))
        runs = [runs[i] for i in order]
        for n, (run, i) in enumerate(zip(runs, order)):
            run.label = run.label if labels else f"{key.rsplit('.', 1)[-1]}={values[i]}"
            run.slug = f"{n}_{_slug(run.label)}"
        add(sweep_figure(runs, key, window), "sweep",
            f"Pos mean, neg mean and neg variance of each run, stacked along {key} (the paper's 3D view)")
        add(sweep_final_figure(runs, key), "sweep_final",
            f"The last epoch's pos and neg score distributions, stacked along {key}")
    add(curves_figure(runs, window, {"ft": "-"}), "curves",
        "Every logged series of the scores used in the loss and the training loss, per step (moving average)")
    if any(r.scores.has("raw") for r in runs):
        add(curves_figure(runs, window, {"ft": "-", "raw": "--"}, with_loss=False), "ft_effect",
            "What Feature Transformation changes: used in the loss (solid) vs untransformed (dashed); "
            "series FT leaves alone (ft.pos or ft.neg none) are drawn once")
    add(final_figure(runs), "final", "Pos and neg score distributions of the last epoch, all runs")
    for run in runs:
        add(density_figure(run), f"density_{run.slug}", f"{run.label}: score distributions over training")
        add(epochs_figure(run), f"epochs_{run.slug}", f"{run.label}: score distribution of each epoch")
    return write_index(out, runs, figures)


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("fastft-viz", __doc__)
    ap.add_argument("runs", nargs="+", metavar="RUN", help="run folders (run.out_dir of fastft-train)")
    ap.add_argument("--out", required=True, metavar="DIR", help="folder for the figures and index.html")
    ap.add_argument("--labels", nargs="+", metavar="NAME", help="legend names, one per run (default: folder names)")
    ap.add_argument("--smooth", type=int, default=0, metavar="STEPS",
                    help="moving-average window of the curves in steps (default: about 1/60 of the run)")
    ap.add_argument("--sweep", action="store_true",
                    help="the runs are a sweep over one config key (found from their config.yaml): add the paper's "
                         "stacked 3D curves, runs ordered by the key's value")
    ap.add_argument("--key", metavar="KEY", help="with --sweep: the swept key (e.g. model.momentum), when the runs "
                                                 "differ in more than one")
    args = ap.parse_args(argv)

    def body() -> None:
        index = draw(args.runs, args.out, args.labels, args.smooth, args.sweep, args.key)
        print(f"fastft-viz: figures for {len(args.runs)} run(s) in {index.parent}; open {index}")

    return cli.run("fastft-viz", body, errors=(VizError, ScoresError))


if __name__ == "__main__":
    sys.exit(main())
