"""Run metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard scalars; the one reader of it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import write_text

FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / FILE
        self.enabled = enabled
        self.tensorboard = enabled and tensorboard
        self._tb = None

    @property
    def tb(self):
        """The TensorBoard writer, made on first use: a run refused before it logs anything leaves no tb/ folder."""
        if self._tb is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.out_dir / "tb"))
        return self._tb

    def log(self, record: dict[str, Any], tb_prefix: str | None = None) -> None:
        """Append `record` (must hold `step`); numbers also go to TensorBoard as `<tb_prefix or kind>/<key>`."""
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            prefix = tb_prefix or record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def histogram(self, tag: str, edges: Sequence[float], counts: Sequence[int], step: int) -> None:
        """A histogram already binned elsewhere (e.g. on the device) to TensorBoard; len(edges) = len(counts) + 1.

        Empty end bins are trimmed, as TensorBoard's own add_histogram does; bin centres stand in for the values
        in `sum` / `sum_squares`.
        """
        if not self.tensorboard:
            return
        counts = np.asarray(counts, dtype=np.float64)
        edges = np.asarray(edges, dtype=np.float64)
        nonzero = np.flatnonzero(counts)
        if nonzero.size == 0:
            return
        lo, hi = nonzero[0], nonzero[-1] + 1
        counts, edges = counts[lo:hi], edges[lo:hi + 1]
        centres = (edges[:-1] + edges[1:]) / 2
        self.tb.add_histogram_raw(tag, min=float(edges[0]), max=float(edges[-1]), num=float(counts.sum()),
                                  sum=float((centres * counts).sum()), sum_squares=float((centres ** 2 * counts).sum()),
                                  bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: on resume they came from work the checkpoint does not hold (step -1: every
        record, on a fresh start)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.out_dir) if r.get("step", 0) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(out_dir: str | Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order ([] when there is none). A line cut short by a killed
    writer is skipped."""
    path = Path(out_dir) / FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# What a run reports, in the order tables show it: its own accuracies, then the baselines beside them.
RESULTS = ("kNN", "linear", "kNN random init", "linear random init", "kNN pixels")


def _last_number(records: list[dict], key: str, kind: str, encoder: str | None = None) -> float | None:
    for r in reversed(records):
        if r.get("kind") == kind and r.get("encoder") == encoder and isinstance(r.get(key), (int, float)):
            return float(r[key])
    return None


def run_results(run_dir: Path, records: list[dict]) -> dict[str, float]:
    """The run's final accuracies and its baselines (RESULTS keys), each only where the run recorded it.

    kNN from summary.json (`knn_top1`, `knn_init_top1`, `knn_pixels_top1`), else from metrics.jsonl (epoch
    records' `knn_top1`, the step-0 kNN record); the linear probe from metrics.jsonl's records of kind "linear",
    one per encoder (`pretrained`, `random_init`).
    """
    summary: dict = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = {}
    found = {
        "kNN": summary.get("knn_top1", _last_number(records, "knn_top1", "epoch")),
        "kNN random init": summary.get("knn_init_top1", _last_number(records, "random_init_top1", "knn")),
        "kNN pixels": summary.get("knn_pixels_top1", _last_number(records, "pixels_top1", "knn")),
        "linear": _last_number(records, "top1", "linear", "pretrained"),
        "linear random init": _last_number(records, "top1", "linear", "random_init"),
    }
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float))}
