"""kNN top-1 against pretraining minutes, beside the random-init and raw-pixel lines (README, "Built-in data").

    python scripts/learning_curves.py --out docs/learning_curves.png \\
        "scenes=runs/curves/scenes_s0,runs/curves/scenes_s1" "photodigits=runs/curves/pd_s0,runs/curves/pd_s1"

Each panel is one dataset: every run folder's kNN (logged at the end of its epochs, `knn.every`) against the
cumulative training wall time of its epochs (`epoch_seconds` in metrics.jsonl: kNN evaluations excluded), and
the mean random-init and pixel kNN of those runs (measured before their first step) as horizontal lines. Prints
the numbers it draws as a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from fastft.metrics import read_metrics


def curve(run: Path) -> tuple[list[float], list[float], float | None, float | None]:
    """(minutes, kNN top-1) at each epoch with a kNN, and the run's random-init and pixel kNN."""
    records = read_metrics(run)
    minutes, knn, elapsed = [], [], 0.0
    for r in sorted((r for r in records if r.get("kind") == "epoch"), key=lambda r: r["epoch"]):
        elapsed += r.get("epoch_seconds", 0.0) / 60
        if r.get("knn_top1") is not None:
            minutes.append(elapsed)
            knn.append(r["knn_top1"])
    base = [r for r in records if r.get("kind") == "knn" and r.get("step") == 0]
    init = base[-1].get("random_init_top1") if base else None
    pixels = base[-1].get("pixels_top1") if base else None
    return minutes, knn, init, pixels


def parse_panel(text: str) -> tuple[str, list[Path]]:
    if "=" not in text:
        raise SystemExit(f"learning_curves: {text!r} is not NAME=RUN[,RUN...]")
    name, runs = text.split("=", 1)
    return name, [Path(r) for r in runs.split(",") if r]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("panels", nargs="+", help="NAME=RUN[,RUN...]: one panel per dataset")
    ap.add_argument("--out", type=Path, required=True, help="PNG (or SVG) to write")
    args = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [parse_panel(p) for p in args.panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    print("| dataset | run | minutes | kNN top-1 | random init | pixels |\n|---|---|---|---|---|---|")
    for ax, (name, runs) in zip(axes[0], panels):
        inits, pixels = [], []
        for run in runs:
            minutes, knn, init, pix = curve(run)
            ax.plot(minutes, knn, marker="o", ms=3, label=f"trained ({run.name})")
            inits += [init] if init is not None else []
            pixels += [pix] if pix is not None else []
            for m, k in zip(minutes, knn):
                print(f"| {name} | {run.name} | {m:.1f} | {k:.3f} | {init if init is None else f'{init:.3f}'} | "
                      f"{pix if pix is None else f'{pix:.3f}'} |")
        if inits:
            ax.axhline(statistics.mean(inits), color="grey", ls="--", label="random init")
        if pixels:
            ax.axhline(statistics.mean(pixels), color="black", ls=":", label="raw pixels")
        ax.set(title=name, xlabel="pretraining minutes (2 CPU cores)", ylabel="kNN top-1 (val)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
