"""`fastft-viz RUN [RUN ...] --out DIR`: the paper's pos/neg score figures from one or more runs.

Draws, from each run's `scores/` folder:
  curves        pos mean, neg mean and neg variance against the iteration, runs overlaid, each run's final
                accuracy (linear if present, else kNN) in the legend
  ft_effect     the same on the features used in the loss (solid) and on the untransformed ones (dashed)
  density_*     per run: the evolving pos and neg score distributions, density over score x iteration
  epochs_*      per run: one pos and one neg density curve per epoch
  final         the last epoch's pos and neg densities of all runs overlaid
each as PNG and SVG, and `index.html` showing them all with every run's config.yaml.
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
from matplotlib import cm, colors, ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from . import cli  # noqa: E402
from .atomic import write_text  # noqa: E402
from .metrics import read_metrics  # noqa: E402
from .score_stats import BinSpec, RunScores, ScoresError, read_scores  # noqa: E402

# The three curves of the paper's figures: (series key, axis title).
CURVES = (("pos_mean", "pos score mean"), ("neg_mean", "neg score mean"), ("neg_var", "neg score variance"))
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
    accuracy: str  # "kNN 91.2%" / "linear 93.0%, kNN 91.2%" / ""
    config_text: str | None


# -- inputs ---------------------------------------------------------------------------------------------------
def _last_number(records: list[dict], key: str, kind: str | None = None) -> float | None:
    for r in reversed(records):
        if r.get("encoder") == "random_init":  # a linear-probe baseline, not this run's encoder
            continue
        if (kind is None or r.get("kind") == kind) and isinstance(r.get(key), (int, float)):
            return float(r[key])
    return None


def run_accuracy(run_dir: Path) -> dict[str, float]:
    """The run's final accuracies: {"linear": ..., "kNN": ...}, each only where the run recorded it.

    Read from summary.json (`linear_top1`, `knn_top1`), else from the last metrics.jsonl record that has one
    (a `fastft.linear` record of kind "linear" with `top1` for the pretrained encoder, an epoch record with
    `knn_top1`).
    """
    summary: dict = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = {}
    records = read_metrics(run_dir)
    found: dict[str, float] = {}
    linear = summary.get("linear_top1")
    if not isinstance(linear, (int, float)):
        linear = _last_number(records, "linear_top1") or _last_number(records, "top1", kind="linear")
    if linear is not None:
        found["linear"] = float(linear)
    knn = summary.get("knn_top1")
    if not isinstance(knn, (int, float)):
        knn = _last_number(records, "knn_top1")
    if knn is not None:
        found["kNN"] = float(knn)
    return found


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
        acc = run_accuracy(p)
        cfg = p / "config.yaml"
        runs.append(Run(name, f"{len(runs)}_{_slug(name)}", scores, ", ".join(f"{k} {v:.1%}" for k, v in acc.items()),
                        cfg.read_text() if cfg.is_file() else None))
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
def curves_figure(runs: list[Run], window: int, feature_styles: dict[str, str]) -> Figure:
    """Pos mean, neg mean, neg variance vs iteration; one line per run (and per feature in `feature_styles`)."""
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(13, 3.8), layout="constrained")
        axes = fig.subplots(1, len(CURVES))
        for run, color in zip(runs, _palette(len(runs))):
            s = run.scores
            w = window or auto_window(len(s.steps))
            for feat, style in feature_styles.items():
                if not s.has(feat):
                    continue
                for ax, (key, _) in zip(axes, CURVES):
                    line, = ax.plot(s.steps, smooth(s.series[f"{feat}_{key}"], w), style, color=color, lw=1.4,
                                    label=_legend_label(run) if feat == "ft" or len(feature_styles) == 1 else None)
                    line.set_gid(f"series:{key}:{run.slug}:{feat}")
        for ax, (_, title) in zip(axes, CURVES):
            ax.set_title(title)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
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
    draw(fig, ax, feature, kind, bins) fills each panel."""
    s = run.scores
    feats = [f for f in ("ft", "raw") if s.has(f)]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(12, 3.4 * len(feats)), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(feats), 2, squeeze=False))
        for row, feat in enumerate(feats):
            for col, (kind, title) in enumerate(KINDS):
                draw(fig, axes[row, col], feat, kind, s.pos_bins if kind == "pos" else s.neg_bins)
                axes[row, col].set_title(f"{title}: {FEATURE_NAMES[feat]}")
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


# -- page -----------------------------------------------------------------------------------------------------
def write_index(out: Path, runs: list[Run], figures: list[tuple[str, str, list[str]]]) -> Path:
    """One page with every figure (PNG inline, SVG linked) and every run's config."""
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(r.label)}</td><td><code>{e(str(r.scores.run_dir))}</code></td><td>{e(r.accuracy or '-')}</td>"
        f"<td>{len(r.scores.steps)}</td><td>{int(r.scores.steps[-1])}</td></tr>" for r in runs)
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
<table><tr><th>run</th><th>folder</th><th>final accuracy</th><th>steps logged</th><th>last step</th></tr>
{rows}</table>
{figs}
<h2>Run configs</h2>
{configs}
</body></html>
"""
    path = out / "index.html"
    write_text(path, page)
    return path


def draw(paths: list[str | Path], out: str | Path, labels: list[str] | None = None, window: int = 0) -> Path:
    """Every figure for `paths` into `out`; returns the index.html path."""
    if not paths:
        raise VizError("no run folders given")
    runs = load_runs(paths, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, list[str]]] = []

    def add(fig: Figure, name: str, caption: str) -> None:
        figures.append((name, caption, _save(fig, out, name)))

    add(curves_figure(runs, window, {"ft": "-"}), "curves",
        "Pos mean, neg mean and neg variance of the scores used in the loss, per step (moving average)")
    if any(r.scores.has("raw") for r in runs):
        add(curves_figure(runs, window, {"ft": "-", "raw": "--"}), "ft_effect",
            "What Feature Transformation changes: used in the loss (solid) vs untransformed (dashed)")
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
    args = ap.parse_args(argv)

    def body() -> None:
        index = draw(args.runs, args.out, args.labels, args.smooth)
        print(f"fastft-viz: figures for {len(args.runs)} run(s) in {index.parent}; open {index}")

    return cli.run("fastft-viz", body, errors=(VizError, ScoresError))


if __name__ == "__main__":
    sys.exit(main())
