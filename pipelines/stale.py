"""Temp files of writers that died: a process killed (SIGKILL, out of memory) inside an atomic write leaves its
temp file behind, which no `finally` removes. Every temp name fastft writes carries its writer's PID
(`.NAME.tmp-PID` from fastft/atomic.py, `OUT.beton.tmp-PID` and `.fastft-convert-PID-*` from convert.py), so
the next run removes exactly those whose writer is gone and leaves a live writer's alone.

(Here, not in fastft/atomic.py, so that the converter in pipelines/, which imports nothing of the core, shares it.)
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_PID = re.compile(r"\.tmp-(\d+)$|^\.fastft-convert-(\d+)-")


def writer_pid(name: str) -> int | None:
    """The PID a temp file or folder name carries, or None when it is no temp name of fastft's."""
    m = _PID.search(name)
    return int(m.group(1) or m.group(2)) if m else None


def writer_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a PID reused by another process counts as alive: the file is
    then left for a later run, never removed under a live writer)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Remove the temp files (and convert folders) in `folder` whose writer is dead; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    entries = folder.rglob("*") if recursive else folder.iterdir()
    for path in list(entries):
        pid = writer_pid(path.name)
        if pid is None or writer_alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
