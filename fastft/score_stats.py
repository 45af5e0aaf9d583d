"""Pos/neg score statistics (docs/design.md, section 2): accumulated on the device every step, written in chunks.

For sample i of a step, on the features the loss used (after Feature Transformation), with the scores
s_ij = q_hat_i . n_j (NOT divided by T) against its K negatives n_j and p_i = q_hat_i . k_hat_i:

    neg mean_i = mean_j s_ij          neg var_i = sum_j (s_ij - neg mean_i)^2 / (K - 1)   (unbiased, as torch.var)
    exp neg_i  = mean_j exp(s_ij / T) exp pos_i = exp(p_i / T)                        pos_i = p_i

(the authors' five numbers). Every step stores the batch mean of each (plus of p_i^2 and mean_j s_ij^2, for
the spread across samples and the pooled neg variance); every chunk of steps stores fixed-bin histograms of all
p_i and all s_ij; and, as the authors log them, the five numbers of the first `scores.samples` samples of every
rank's batch (per-sample rows: neg mean, neg var and pos in fp16, the two exp terms in fp32, since
exp(1 / 0.07) overflows fp16). With `scores.untransformed` the same is recorded on the clean q, k against the
stored queue.

The input is what MoCo's forward returned (fastft/moco.py `MoCoStep`): the positive scores and the NegStats
that the loss computed in its own pass (torch or fused kernel alike, binned with `ScoreRecorder.neg_bins`), and
the clean q, k, which with the queue the loss read give the untransformed statistics. Nothing here reads a
value back to the host until a flush.

On disk, RUN/scores/ holds one `chunk_<first step>.npz` per flush (plain arrays, no pickles) and `index.json`
(bin settings, chunk list). Both are written atomically and the index last, so a reader never sees a chunk that
is half written, and a chunk the index does not list (a crash between the two writes) is ignored and replaced.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from fastft.kernels import NegStats, histogram, neg_score_stats

from .atomic import write_atomic
from .config import ConfigError, ScoresConfig
from .distributed import is_dist, world_size

if TYPE_CHECKING:
    from .metrics import MetricsLog
    from .moco import MoCoStep

FORMAT = "fastft-scores"
VERSION = 1
FOLDER = "scores"
INDEX = "index.json"
# Batch means stored per step, in this column order (see the module docstring).
SERIES = ("pos_mean", "pos_sq_mean", "neg_mean", "neg_sq_mean", "neg_var", "exp_neg_mean", "exp_pos_mean")
# The per-sample rows, in the authors' column order (their mem_moco.py): the first SAMPLE_FP16 stored as fp16.
SAMPLE_SERIES = ("neg_mean", "neg_var", "pos", "exp_neg", "exp_pos")
SAMPLE_FP16 = 3
# ft: the features used in the loss; raw: the clean q, k and the stored queue.
FEATURES = ("ft", "raw")
# A collapsed projection (every key points one way) leaves the untransformed negative scores almost no variance:
# 4e-6 or less in every collapsed run measured, 4e-3 or more in every healthy one (docs/collapse.md).
COLLAPSED_NEG_VAR = 1e-3
_CHUNK = re.compile(r"^chunk_(\d+)\.npz$")


class ScoresError(ValueError):
    """A run folder whose score files are missing, unreadable or not comparable with another run's."""


@dataclass(frozen=True)
class BinSpec:
    """`n` equal bins over [lo, hi); scores outside land in the end bins (kernels.reference.histogram_bins)."""
    lo: float
    hi: float
    n: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi and self.n >= 1):
            raise ConfigError(f"score bins [{self.lo}, {self.hi}) x {self.n}: need lo < hi and at least one bin")

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.n + 1)

    def as_list(self) -> list:
        return [self.lo, self.hi, self.n]

    def as_tuple(self) -> tuple[float, float, int]:
        """(lo, hi, nbins), as kernels.reference.histogram, the losses and the fused kernel take them."""
        return (self.lo, self.hi, self.n)

    def describe(self) -> str:
        return f"[{self.lo:g}, {self.hi:g}) in {self.n} bins"


def bins_from_config(cfg: ScoresConfig) -> tuple[BinSpec, BinSpec]:
    return BinSpec(cfg.pos_lo, cfg.pos_hi, cfg.bins), BinSpec(cfg.neg_lo, cfg.neg_hi, cfg.bins)


# -- the statistics -------------------------------------------------------------------------------------------
def per_sample(pos: torch.Tensor, neg: NegStats, num_neg: int, temperature: float) -> torch.Tensor:
    """[B, len(SAMPLE_SERIES)]: each sample's five numbers, on the device."""
    pos = pos.float()
    mean = neg.sum / num_neg
    # Unbiased, as the authors' torch.var: (E[s^2] - E[s]^2) K / (K - 1); the difference can dip below 0 by rounding.
    var = (neg.sumsq / num_neg - mean * mean).clamp_min(0) * (num_neg / max(1, num_neg - 1))
    return torch.stack([mean, var, pos, neg.sumexp / num_neg, (pos / temperature).exp()], dim=1)


def batch_means(rows: torch.Tensor, neg: NegStats, num_neg: int) -> torch.Tensor:
    """[len(SERIES)] batch means, from the `per_sample` rows of the batch (and the negatives' sum of squares)."""
    m = rows.mean(0)
    pos = rows[:, 2]
    return torch.stack([m[2], (pos * pos).mean(), m[0], (neg.sumsq / num_neg).mean(), m[1], m[3], m[4]])


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() * b.float()).sum(1)


# -- files ----------------------------------------------------------------------------------------------------
def _chunk_name(first_step: int) -> str:
    return f"chunk_{first_step:010d}.npz"


@dataclass
class Chunk:
    """One flush: the steps it covers, their per-step batch means, the chunk's histograms, per-sample rows."""
    steps: np.ndarray  # [S] int64, step count after each step (as in metrics.jsonl)
    epochs: np.ndarray  # [S] int64, 0-based epoch of each step
    means: dict[str, np.ndarray]  # feature -> [S, len(SERIES)] float32
    hists: dict[str, np.ndarray]  # feature -> [2, nbins] int64 (row 0 pos, row 1 neg)
    # feature -> [S, ranks, samples, len(SAMPLE_SERIES)] float32, NaN where a rank's batch was shorter
    samples: dict[str, np.ndarray] = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"step": self.steps, "epoch": self.epochs}
        for feat in self.means:
            for j, name in enumerate(SERIES):
                out[f"{feat}_{name}"] = self.means[feat][:, j]
            out[f"{feat}_hist_pos"], out[f"{feat}_hist_neg"] = self.hists[feat][0], self.hists[feat][1]
        for feat, rows in self.samples.items():
            out[f"{feat}_samples_fp16"] = rows[..., :SAMPLE_FP16].astype(np.float16)
            out[f"{feat}_samples_exp"] = rows[..., SAMPLE_FP16:].astype(np.float32)
        return out


def _read_index(folder: Path) -> dict:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ScoresError(f"{path} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ScoresError(f"{path} is not a fastft score index (no 'format: {FORMAT}' marker)")
    if index.get("version") != VERSION:
        raise ScoresError(f"{path} is version {index.get('version')}; this fastft reads version {VERSION}")
    return index


class ScoreStore:
    """The score files of one run (written by the main process only)."""

    def __init__(self, run_dir: str | Path):
        self.folder = Path(run_dir) / FOLDER
        self.index: dict = {}

    def begin(self, meta: dict, resume_step: int) -> None:
        """Keep the chunks up to `resume_step` (what the checkpoint covers), drop the rest, write the index."""
        self.folder.mkdir(parents=True, exist_ok=True)
        kept: list[dict] = []
        if (self.folder / INDEX).is_file() and resume_step > 0:
            try:
                old = _read_index(self.folder)
            except ScoresError as e:
                warnings.warn(f"{e}; starting the score files afresh")
            else:
                kept = [c for c in old["chunks"] if c["last_step"] <= resume_step]
                if kept and old["bins"] != meta["bins"]:
                    raise ConfigError(
                        f"{self.folder / INDEX} holds scores up to step {kept[-1]['last_step']} binned as "
                        f"{_bins_text(old['bins'])}, but this run bins them as {_bins_text(meta['bins'])}; "
                        f"resume with the same scores.bins / scores.pos_* / scores.neg_*, or use another run.out_dir")
        names = {c["file"] for c in kept}
        for p in self.folder.iterdir():  # later chunks, orphans of a crash between writes, write_atomic temp files
            if (p.name.startswith(".") and ".tmp-" in p.name) or (_CHUNK.match(p.name) and p.name not in names):
                p.unlink(missing_ok=True)
        self.index = {"format": FORMAT, "version": VERSION, **meta, "chunks": kept}
        self._write_index()

    def append(self, chunk: Chunk, epoch: int) -> None:
        first, last = int(chunk.steps[0]), int(chunk.steps[-1])
        name = _chunk_name(first)
        # Compressed (histograms are mostly empty bins); whole or absent, as checkpoints are.
        write_atomic(self.folder / name, chunk.arrays(), lambda arrays, f: np.savez_compressed(f, **arrays))
        self.index["chunks"].append({"file": name, "first_step": first, "last_step": last, "epoch": epoch,
                                     "steps": len(chunk.steps), "features": sorted(chunk.means)})
        self._write_index()

    def _write_index(self) -> None:
        # One chunk per line: readable, and small enough to rewrite at every flush of a long run.
        head = {k: v for k, v in self.index.items() if k != "chunks"}
        lines = ",\n  ".join(json.dumps(c) for c in self.index["chunks"])
        text = (json.dumps(head)[:-1] + ',\n "chunks": [' + (f"\n  {lines}\n " if lines else "") + "]}\n").encode()
        write_atomic(self.folder / INDEX, text, lambda data, f: f.write(data))


def _bins_text(bins: dict) -> str:
    return f"pos {BinSpec(*bins['pos']).describe()}, neg {BinSpec(*bins['neg']).describe()}"


MAX_CHUNK_STEPS = 200


def chunk_steps(cfg: ScoresConfig, steps_per_epoch: int | None = None) -> int:
    """Steps per chunk: scores.flush_every, or for 0 about 10 chunks per epoch, at most MAX_CHUNK_STEPS."""
    if cfg.flush_every or not steps_per_epoch:
        return cfg.flush_every or MAX_CHUNK_STEPS
    return min(MAX_CHUNK_STEPS, -(-steps_per_epoch // 10))


# -- the recorder -------------------------------------------------------------------------------------------
class ScoreRecorder:
    """Accumulates the statistics of each step on the device; `commit` after each step, `flush` at epoch end.

    All processes observe and flush at the same steps; under DDP a flush averages the batch means and sums the
    histograms over ranks (one all_reduce per flush), and only the process given a `store` writes.
    """

    def __init__(self, cfg: ScoresConfig, temperature: float, device: torch.device,
                 store: ScoreStore | None = None, metrics: MetricsLog | None = None, flush_every: int | None = None,
                 transformed: tuple[bool, bool] = (True, True)):
        """`flush_every`: steps per chunk, in place of cfg.flush_every (the trainer resolves its 0 = auto).
        `transformed`: whether FT changes the (pos, neg) scores at all (ft.pos / ft.neg not none); a reader
        then knows that the untransformed pos or neg scores equal those after FT."""
        self.cfg = cfg
        self.temperature = temperature
        self.transformed = transformed
        self.pos_bins, self.neg_bins = bins_from_config(cfg)
        self.features = FEATURES if cfg.untransformed else FEATURES[:1]
        self.store = store
        self.metrics = metrics
        self.capacity = flush_every or chunk_steps(cfg)
        self.means = torch.zeros(self.capacity, len(self.features), len(SERIES), device=device)
        self.hists = torch.zeros(len(self.features), 2, cfg.bins, dtype=torch.int64, device=device)
        self.samples = torch.full((self.capacity, len(self.features), cfg.samples, len(SAMPLE_SERIES)), math.nan,
                                  device=device)
        self.rows = 0  # steps observed in the current chunk (a host counter: no sync)
        self.steps: list[int] = []
        self.epochs: list[int] = []

    def meta(self, num_neg: int | None = None) -> dict:
        return {"temperature": self.temperature, "negatives": num_neg, "world_size": world_size(),
                "bins": {"pos": self.pos_bins.as_list(), "neg": self.neg_bins.as_list()},
                "features": list(self.features), "series": list(SERIES), "sample_series": list(SAMPLE_SERIES),
                "transformed": {"pos": self.transformed[0], "neg": self.transformed[1]}}

    def begin(self, step: int, num_neg: int | None = None) -> None:
        """Start (or resume at `step`): score chunks past `step` are dropped."""
        self.rows, self.steps, self.epochs = 0, [], []
        self.hists.zero_()
        if self.store is not None:
            self.store.begin(self.meta(num_neg), step)

    @torch.no_grad()
    def observe(self, step: MoCoStep, queue: torch.Tensor) -> None:
        """Record one step: its scores after FT and, with `untransformed`, the clean q, k against `queue`, the
        stored queue this step's loss read (before MoCo.enqueue)."""
        if self.rows >= self.capacity:
            raise RuntimeError("ScoreRecorder.observe called again before commit(): one observe per step")
        if step.neg is None:
            raise RuntimeError("ScoreRecorder.observe: the step has no negative-score statistics; run MoCo's "
                               "forward with stats_bins=recorder.neg_bins.as_tuple()")
        num_neg = queue.shape[0]
        self._add(0, step.pos, step.neg, num_neg)
        if len(self.features) > 1:
            pos, neg = step.pos, step.neg
            if step.draw.transformed:
                pos = rowdot(step.q, step.k)
                neg = neg_score_stats(step.q.float() @ queue.float().t(), self.temperature, self.neg_bins.as_tuple())
            self._add(1, pos, neg, num_neg)
        self.rows += 1

    def _add(self, feat: int, pos: torch.Tensor, neg: NegStats, num_neg: int) -> None:
        rows = per_sample(pos, neg, num_neg, self.temperature)
        self.means[self.rows, feat] = batch_means(rows, neg, num_neg)
        n = min(self.cfg.samples, rows.shape[0])
        self.samples[self.rows, feat, :n] = rows[:n]
        self.hists[feat, 0] += histogram(pos, self.pos_bins.as_tuple())
        self.hists[feat, 1] += neg.hist

    def commit(self, step: int, epoch: int) -> None:
        """The step just observed finished as optimizer step `step` of (0-based) `epoch`; flushes when full."""
        if self.rows != len(self.steps) + 1:
            raise RuntimeError(f"ScoreRecorder.commit(step {step}) without a matching observe()")
        self.steps.append(step)
        self.epochs.append(epoch)
        if self.rows == self.capacity:
            self.flush()

    def flush(self) -> None:
        """Move the accumulated chunk to the host (the one sync), write it, and start the next one."""
        if not self.steps:
            return
        means, hists, samples = self.means[:self.rows], self.hists.clone(), self.samples[:self.rows].unsqueeze(0)
        if is_dist() and world_size() > 1:
            means = means.contiguous()
            dist.all_reduce(means)
            means /= world_size()
            dist.all_reduce(hists)
            if self.cfg.samples:
                gathered = [torch.empty_like(samples) for _ in range(world_size())]
                dist.all_gather(gathered, samples.contiguous())
                samples = torch.cat(gathered)
        means, hists = means.cpu().numpy(), hists.cpu().numpy()
        samples = samples.cpu().numpy().copy()  # [ranks, S, features, samples, 5]; a copy: the buffer is reused
        chunk = Chunk(np.asarray(self.steps, dtype=np.int64), np.asarray(self.epochs, dtype=np.int64),
                      {f: means[:, i].copy() for i, f in enumerate(self.features)},
                      {f: hists[i] for i, f in enumerate(self.features)},
                      {f: samples[:, :, i].transpose(1, 0, 2, 3) for i, f in enumerate(self.features)}
                      if self.cfg.samples else {})
        self.samples.fill_(math.nan)
        epoch, last = self.epochs[-1], self.steps[-1]
        self.rows, self.steps, self.epochs = 0, [], []
        self.hists.zero_()
        if self.store is not None:
            self.store.append(chunk, epoch)
        if self.metrics is not None:
            self._log(chunk, last, epoch)

    def _log(self, chunk: Chunk, step: int, epoch: int) -> None:
        """Interval means to metrics.jsonl / TensorBoard scalars, and the histograms to TensorBoard."""
        record: dict = {"kind": "scores", "step": step, "epoch": epoch}
        for feat, m in chunk.means.items():
            prefix = "" if feat == "ft" else f"{feat}_"
            for j, name in enumerate(SERIES):
                record[prefix + name] = float(m[:, j].mean())
        self.metrics.log(record)
        for feat, h in chunk.hists.items():
            self.metrics.histogram(f"scores/{feat}_pos", self.pos_bins.edges(), h[0], step)
            self.metrics.histogram(f"scores/{feat}_neg", self.neg_bins.edges(), h[1], step)


# -- reading --------------------------------------------------------------------------------------------------
@dataclass
class RunScores:
    """Everything one run logged, concatenated in step order."""
    run_dir: Path
    temperature: float
    pos_bins: BinSpec
    neg_bins: BinSpec
    steps: np.ndarray  # [S]
    epochs: np.ndarray  # [S]
    series: dict[str, np.ndarray] = field(default_factory=dict)  # "ft_neg_var" -> [S]; NaN where not logged
    chunk_first: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [C]
    chunk_last: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [C]
    chunk_epoch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [C]
    hists: dict[str, np.ndarray] = field(default_factory=dict)  # "ft_pos" -> [C, nbins]; 0 where not logged
    # Per-sample rows: "ft" / "raw" -> [R, len(SAMPLE_SERIES)] float32 (fp16-rounded where stored so), and for
    # each row its "step", "epoch" (0-based), "rank" and "sample" (index in that rank's batch) -> [R]
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    sample_index: dict[str, np.ndarray] = field(default_factory=dict)
    # Whether FT changes the pos / neg scores at all; where not, the untransformed ones equal those after FT.
    transformed: dict[str, bool] = field(default_factory=lambda: {"pos": True, "neg": True})

    def has(self, feature: str) -> bool:
        """Whether any chunk logged `feature` ("ft" or "raw")."""
        return bool(np.isfinite(self.series[f"{feature}_pos_mean"]).any())

    def bins_key(self) -> tuple:
        return (self.pos_bins, self.neg_bins)


def read_scores(run_dir: str | Path) -> RunScores:
    """The score statistics of a run folder, or ScoresError saying what is missing."""
    run_dir = Path(run_dir)
    folder = run_dir / FOLDER
    if not run_dir.is_dir():
        raise ScoresError(f"run folder {run_dir} does not exist")
    if not (folder / INDEX).is_file():
        raise ScoresError(f"{run_dir} has no score statistics yet ({folder / INDEX} does not exist): train it with "
                          f"scores.enabled=true and let it reach a flush (every scores.flush_every steps and at "
                          f"each epoch end)")
    index = _read_index(folder)
    if not index["chunks"]:
        raise ScoresError(f"{run_dir} has no score statistics yet ({folder / INDEX} lists no chunks): let the "
                          f"run reach a flush (every scores.flush_every steps and at each epoch end)")
    pos_bins, neg_bins = BinSpec(*index["bins"]["pos"]), BinSpec(*index["bins"]["neg"])
    chunks = []
    for c in index["chunks"]:
        path = folder / c["file"]
        try:
            with np.load(path, allow_pickle=False) as z:
                chunks.append({k: z[k] for k in z.files})
        except (OSError, ValueError) as e:
            raise ScoresError(f"score chunk {path} (listed in {folder / INDEX}) cannot be read: {e}") from e
    out = RunScores(run_dir, float(index["temperature"]), pos_bins, neg_bins,
                    np.concatenate([z["step"] for z in chunks]), np.concatenate([z["epoch"] for z in chunks]))
    for feat in FEATURES:
        for name in SERIES:
            key = f"{feat}_{name}"
            out.series[key] = np.concatenate([z[key].astype(np.float64) if key in z
                                              else np.full(len(z["step"]), np.nan) for z in chunks])
        for kind, bins in (("pos", pos_bins), ("neg", neg_bins)):
            key = f"{feat}_hist_{kind}"
            out.hists[f"{feat}_{kind}"] = np.stack([z[key] if key in z else np.zeros(bins.n, np.int64)
                                                    for z in chunks])
    _read_samples(out, chunks)
    out.transformed = {k: bool(v) for k, v in index.get("transformed", out.transformed).items()}
    out.chunk_first = np.array([c["first_step"] for c in index["chunks"]], dtype=np.int64)
    out.chunk_last = np.array([c["last_step"] for c in index["chunks"]], dtype=np.int64)
    out.chunk_epoch = np.array([c["epoch"] for c in index["chunks"]], dtype=np.int64)
    return out


def _read_samples(out: RunScores, chunks: list[dict[str, np.ndarray]]) -> None:
    """The per-sample rows of every chunk that has them, flattened to one row per (step, rank, sample)."""
    rows: dict[str, list[np.ndarray]] = {f: [] for f in FEATURES}
    index: dict[str, list[np.ndarray]] = {k: [] for k in ("step", "epoch", "rank", "sample")}
    for z in chunks:
        feats = [f for f in FEATURES if f"{f}_samples_fp16" in z]
        if not feats:
            continue
        grid = {f: np.concatenate([z[f"{f}_samples_fp16"].astype(np.float32), z[f"{f}_samples_exp"]], axis=-1)
                for f in feats}  # [S, ranks, samples, 5]
        steps, ranks, samples = grid[feats[0]].shape[:3]
        keep = ~np.isnan(grid[feats[0]][..., SAMPLE_SERIES.index("pos")])  # NaN: a rank's batch was shorter
        s_i, r_i, n_i = np.meshgrid(np.arange(steps), np.arange(ranks), np.arange(samples), indexing="ij")
        index["step"].append(z["step"][s_i[keep]])
        index["epoch"].append(z["epoch"][s_i[keep]])
        index["rank"].append(r_i[keep])
        index["sample"].append(n_i[keep])
        for f in FEATURES:
            rows[f].append(grid[f][keep] if f in grid else np.full((int(keep.sum()), len(SAMPLE_SERIES)), np.nan,
                                                                   np.float32))
    if index["step"]:
        out.samples = {f: np.concatenate(r) for f, r in rows.items()}
        out.sample_index = {k: np.concatenate(v).astype(np.int64) for k, v in index.items()}
