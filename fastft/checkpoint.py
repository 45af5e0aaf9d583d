"""Exactly-resumable checkpoints: written atomically (fastft/atomic.py), loaded with `weights_only=True` (no
arbitrary pickles), refused with a reason when they do not fit the run that wants them.

A checkpoint is judged by whether it loads, never by its file name alone: a file that does not load (a truncated
copy, say) is moved aside into `checkpoints/unreadable/`, never counted as the newest and never a reason to
delete one that loads. Nothing here deletes a checkpoint except pruning beyond `run.keep_ckpts` readable ones.
"""
from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .atomic import write_atomic

FORMAT = "fastft-checkpoint"
VERSION = 1
_NAME = re.compile(r"^epoch_(\d{4,})\.pt$")
UNREADABLE = "unreadable"  # checkpoints/unreadable/: files that did not load, set aside (never deleted)
EARLIER = "earlier"  # checkpoints/earlier/: a previous run's checkpoints, set aside when a run starts afresh

# How config keys are classed for resuming. Training-defining keys must match the checkpoint's; these may change:
# where output goes, how often things are logged, checkpointed or evaluated, how loading is parallelised.
RESUME_FREE_KEYS = {
    "run.out_dir", "run.resume", "run.progress", "run.tensorboard", "run.log_every", "run.compile",
    "run.device", "run.ckpt_every", "run.keep_ckpts", "run.epochs_per_job", "run.threads", "loader.workers",
    "data.cache_dir",
    # What an unreadable image does: the policy only stops a run or not; what it trains on is the same.
    "data.on_bad_image", "data.max_bad_fraction",
}
# Whole sections that only evaluate or log: the kNN monitor, score logging (fastft/score_stats.py checks its own
# bins on resume) and the linear probe's settings.
RESUME_FREE_SECTIONS = {"knn", "scores", "linear"}
# Training-defining, yet changeable on resume: the run's length. From the resumed step on the lr follows the
# schedule of the new length, as a run configured with it from the start would (README, "What a run does").
RESUME_EXTENDABLE_KEYS = {"optim.epochs"}
RESUME_HINT = "Use the same config, another run.out_dir, or run.resume=none to start afresh."


class CheckpointError(RuntimeError):
    pass


def checkpoint_path(out_dir: str | Path, epoch: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"epoch_{epoch:04d}.pt"


def save(ckpt: dict, out_dir: str | Path, epoch: int, keep: int) -> Path:
    """Write `ckpt` as the checkpoint of `epoch` and keep only the `keep` newest."""
    path = checkpoint_path(out_dir, epoch)
    write_atomic(path, ckpt)
    prune(out_dir, keep)
    return path


def load(path: str | Path, lazy: bool = False) -> dict:
    """A fastft checkpoint, or CheckpointError saying why `path` is not one. `lazy`: tensors are memory-mapped,
    not read (enough to tell whether the file is whole)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated "
                              f"or not a torch file") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastft checkpoint (no 'format: {FORMAT}' marker)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} is a fastft checkpoint of version {ckpt.get('version')}; "
                              f"this fastft reads version {VERSION}")
    return ckpt


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints in `out_dir`, by file name, newest first (whether they load is not checked)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def scan(out_dir: str | Path) -> tuple[tuple[Path, dict] | None, list[tuple[Path, str]]]:
    """The newest checkpoint that loads (path, contents), and the newer ones that do not, with the reason."""
    unreadable = []
    for path in list_checkpoints(out_dir):
        try:
            return (path, load(path)), unreadable
        except CheckpointError as e:
            unreadable.append((path, str(e)))
    return None, unreadable


def newest_good(out_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; unreadable ones are skipped with a warning (and left where they are)."""
    found, unreadable = scan(out_dir)
    for _, why in unreadable:
        warnings.warn(f"skipping {why}")
    return found


def set_aside(path: Path, into: str, why: str = "", folder: Path | None = None) -> Path:
    """Move checkpoint `path` into checkpoints/<into>/ (or `folder`; never over another file) and warn, naming
    both."""
    folder = folder or path.parent / into
    folder.mkdir(parents=True, exist_ok=True)
    dest, n = folder / path.name, 0
    while dest.exists():
        n += 1
        dest = folder / f"{path.name}.{n}"
    os.replace(path, dest)
    warnings.warn(f"{path} moved to {dest}" + (f": {why}" if why else "") + " (nothing was deleted)")
    return dest


def _loads(path: Path) -> bool:
    """Whether checkpoint `path` loads (tensors memory-mapped, not read); one that does not is moved into
    checkpoints/unreadable/."""
    try:
        load(path, lazy=True)
    except CheckpointError as e:
        set_aside(path, UNREADABLE, str(e))
        return False
    return True


def set_aside_all(out_dir: str | Path) -> None:
    """Before a run starts afresh in `out_dir`: every checkpoint there is moved aside (unreadable ones into
    checkpoints/unreadable/, an earlier run's into checkpoints/earlier/), so that pruning never weighs them
    against the new run's."""
    for path in list_checkpoints(out_dir):
        if _loads(path):
            set_aside(path, EARLIER, "this run starts afresh")


def prune(out_dir: str | Path, keep: int) -> None:
    """Keep the `keep` newest checkpoints that load; delete older ones; move any that do not load aside."""
    kept = 0
    for path in list_checkpoints(out_dir):
        if not _loads(path):
            continue
        kept += 1
        if kept > keep:
            path.unlink(missing_ok=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_compatible(saved: dict, current: dict, path: str | Path, free_keys: set[str] = RESUME_FREE_KEYS,
                     free_sections: set[str] = RESUME_FREE_SECTIONS, hint: str = RESUME_HINT,
                     defaults: dict | None = None) -> None:
    """Refuse a checkpoint whose run was configured differently (apart from the free keys and sections).
    A key the checkpoint lacks (it predates the key) matches when the config leaves it at its default in
    `defaults`: that run had the behaviour the default gives."""
    a, b = _flatten(saved), _flatten(current)
    d = _flatten(defaults) if defaults is not None else {}
    free = lambda k: k in free_keys or k.split(".", 1)[0] in free_sections
    older = lambda k: k not in a and k in d and b.get(k) == d[k]
    diffs = [k for k in sorted(set(a) | set(b))
             if not free(k) and not older(k) and a.get(k, "<missing>") != b.get(k, "<missing>")]
    if diffs:
        shown = "; ".join(f"{k}: checkpoint {a.get(k, '<missing>')!r} vs config {b.get(k, '<missing>')!r}"
                          for k in diffs[:6])
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise CheckpointError(f"checkpoint {path} was written by a run with another config: {shown}{more}. {hint}")


def rng_state() -> dict:
    """Every RNG the run draws from, in types `weights_only` loading accepts."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
