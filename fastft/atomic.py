"""Atomic file writes: every file fastft writes is whole or absent, never half written.

Written to a temp file in the same folder, fsynced, then renamed over the target, and the rename itself made
durable: a process killed while writing leaves the previous file (or none) untouched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch


def write_atomic(path: str | Path, obj: Any, dump: Callable[[Any, BinaryIO], None] = torch.save) -> None:
    """Write `obj` with `dump` (torch.save by default; pickle.dump, np.savez, ...) so `path` is whole or untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def write_text(path: str | Path, text: str) -> None:
    write_atomic(path, text.encode(), lambda data, f: f.write(data))


def write_json(path: str | Path, record: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(record, indent=indent) + "\n")
