"""An ImageFolder tree or a built-in dataset -> an FFCV .beton file: the conversion behind the
`fastft-convert-dataset` command (convert_cli.py) and the ffcv loader's conversion of built-in data on first use.

Written to OUT.beton.tmp-PID and renamed into place when complete, so an interrupted run never leaves an OUT.beton
that a later run would trust; the temp files and `.fastft-convert-PID-*` folders of a conversion that was killed
outright are removed by the next one into the same folder (stale.py). Beside it, OUT.beton.json records the class names (labels are their index in
sorted order, as torchvision's ImageFolder), each sample's source file and any samples skipped as unreadable.
A writer worker that dies (killed, out of memory) is an error, not a hang; a caller that handles SIGINT/SIGTERM
itself sets INTERRUPTED before raising KeyboardInterrupt (convert_cli.py does), so that the interrupt is not
lost in code that swallows it.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
import _thread
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bad_images import IMAGE_EXTENSIONS, UnreadableImage, load_rgb
from .stale import remove_stale
WRITE_MODES = ("smart", "raw", "jpg", "proportion")
META_FORMAT = "fastft-beton/1"  # the same string as ffcv_loader.META_FORMAT (which imports ffcv)


class ConvertError(RuntimeError):
    """A source or destination problem, reported with the path and what is valid."""


@dataclass
class Source:
    root: Path
    classes: list[str]
    files: list[str]  # relative to root
    labels: list[int]
    empty_classes: list[str] = field(default_factory=list)


@dataclass
class ConvertResult:
    out: Path
    written: int
    skipped: list[tuple[str, str]]  # (path, why)
    classes: int
    seconds: float


def resolve_source(src: str, split: str, cache_dir: str) -> Path:
    """The class-folder root that SRC names: a folder, or `builtin:NAME` materialised and its `split`."""
    from .builtin import is_builtin, materialize

    if is_builtin(src):
        root = materialize(src, cache_dir) / split
        if not root.is_dir():
            raise ConvertError(f"{src}: no split {split!r}; valid: train, val")
        return root
    root = Path(src).expanduser()
    if not root.exists():
        raise ConvertError(f"{src}: no such folder (expected an ImageFolder split such as /data/imagenet/train "
                           f"holding one folder per class, or builtin:digits)")
    if not root.is_dir():
        raise ConvertError(f"{src}: is a file, not a folder of class folders")
    return root


def scan(root: Path, subset: list[str] | None = None, allow_empty: bool = False) -> Source:
    """Class folders (sorted, optionally only `subset`) and their image files, by extension."""
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subset is not None:
        missing = [c for c in subset if c not in present]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ConvertError(f"{root}: {len(missing)} classes of the subset have no folder: {shown}")
        classes = sorted(set(subset))
    else:
        classes = present
    if not classes:
        raise ConvertError(f"{root}: holds no class folders (expected {root}/<class>/<image files>)")
    files, labels, empty = [], [], []
    for label, name in enumerate(classes):
        images = sorted(str(p.relative_to(root)) for p in (root / name).rglob("*")
                        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            empty.append(name)
        files += images
        labels += [label] * len(images)
    if empty and not allow_empty:
        raise ConvertError(f"{root / empty[0]}: class folder holds no images (extensions: "
                           f"{', '.join(IMAGE_EXTENSIONS)})" + (f"; {len(empty) - 1} more empty classes"
                                                                if len(empty) > 1 else "")
                           + " (--skip-bad converts anyway)")
    return Source(root, classes, files, labels, empty)


class _Images:
    """The indexable dataset FFCV's writer workers read: (uint8 HxWx3, label).

    A file that fails to decode must not raise here: ffcv's writer then waits forever for the dead worker.
    It is logged (index, path, error) to a per-process file and a 1x1 placeholder is written instead; the
    caller turns the log into an error or, with --skip-bad, into the sidecar's list of skipped samples.
    """

    def __init__(self, source: Source, log_dir: str):
        self.root, self.files, self.labels, self.log_dir = str(source.root), source.files, source.labels, log_dir

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = os.path.join(self.root, self.files[i])
        try:
            arr = np.asarray(load_rgb(path))  # the loaders' judge of what reads (bad_images.py)
        except UnreadableImage as e:
            with open(os.path.join(self.log_dir, f"bad-{os.getpid()}.tsv"), "a") as log:
                log.write(f"{i}\t{path}\t{e.reason}\n")
            arr = np.zeros((1, 1, 3), dtype=np.uint8)
        return arr, self.labels[i]


def _read_bad(log_dir: str) -> dict[int, tuple[str, str]]:
    bad = {}
    for log in Path(log_dir).glob("bad-*.tsv"):
        for line in log.read_text().splitlines():
            i, path, why = line.split("\t", 2)
            bad[int(i)] = (path, why)
    return bad


def _children() -> set[int]:
    import psutil  # comes with ffcv

    return {c.pid for c in psutil.Process().children()}


def _dead_children(ignore: set[int]) -> list[tuple[int, str]]:
    """Child processes (other than `ignore`: the caller's own, older children) that have exited with an error,
    found without reaping them (WNOWAIT), so that multiprocessing's own bookkeeping is untouched; a worker that
    dies at once is caught too."""
    import psutil  # comes with ffcv

    dead = []
    for child in psutil.Process().children():
        if child.pid in ignore:
            continue
        try:
            info = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            continue
        if info is not None and not (info.si_code == os.CLD_EXITED and info.si_status == 0):
            how = f"exit code {info.si_status}" if info.si_code == os.CLD_EXITED else f"signal {info.si_status}"
            dead.append((child.pid, how))
    return dead


# Set by a caller's SIGINT/SIGTERM handler (convert_cli.py's). Its KeyboardInterrupt can land in code that swallows
# exceptions (fork handlers while ffcv starts its workers), so the watcher keeps re-raising until the main thread
# acts.
INTERRUPTED = threading.Event()


class _WorkerWatch:
    """Interrupts the main thread if a writer worker dies (killed, out of memory): ffcv would wait forever.
    Also repeats a signal's interrupt until the main thread has taken it. Children that existed before the
    conversion (a test runner's, a training job's) are not ours to judge; after `close()` returns no interrupt
    can come, so nothing leaks into the caller's later code."""

    def __init__(self) -> None:
        self.died: list[tuple[int, str]] = []
        self._ignore = _children()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # interrupt_main() does nothing while SIGINT is not handled by Python, as in a job that a shell without
        # job control started in the background (a CI run hung so): handle it for as long as the watch runs.
        self._sigint = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL):
            self._sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            dead = [] if INTERRUPTED.is_set() else _dead_children(self._ignore)
            with self._lock:
                if self._stop.is_set():
                    return
                if INTERRUPTED.is_set():
                    _thread.interrupt_main()
                elif dead:
                    self.died.extend(dead)
                    _thread.interrupt_main()
                    return

    def close(self) -> None:
        with self._lock:
            self._stop.set()
        self._thread.join()
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None


def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def convert(src: str, out: str | Path, *, split: str = "train", subset: str | None = None,
            max_resolution: int | None = None, jpeg_quality: int = 90, compress_probability: float = 0.5,
            write_mode: str = "smart", smart_threshold: int = 64 * 64 * 3, num_workers: int = 0,
            force: bool = False, skip_bad: bool = False, cache_dir: str = "~/.cache/fastft") -> ConvertResult:
    """Convert SRC to OUT (see the module doc). Raises ConvertError naming the path at fault."""
    try:
        from .ffcv_loader import write_beton
    except ImportError as e:
        raise ConvertError(f"writing .beton files needs FFCV, the ffcv extra: pip install 'fastft[ffcv]' "
                           f"({e})") from None
    from .imagefolder import read_class_list

    out = Path(out).expanduser()
    if write_mode not in WRITE_MODES:
        raise ConvertError(f"--write-mode {write_mode!r}: valid: {', '.join(WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise ConvertError(f"--jpeg-quality {jpeg_quality}: valid range is 1..100")
    if not 0.0 <= compress_probability <= 1.0:
        raise ConvertError(f"--compress-probability {compress_probability}: valid range is 0..1")
    if max_resolution is not None and max_resolution < 1:
        raise ConvertError(f"--max-resolution {max_resolution}: must be a positive number of pixels")
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists; pass --force to overwrite it")
    if next((p for p in out.parents if p.exists()), Path(".")).is_file():
        raise ConvertError(f"{out}: a parent of it is a file, not a folder; choose another output path")
    root = resolve_source(src, split, cache_dir)
    if subset is not None and not Path(subset).is_file():
        raise ConvertError(f"--subset {subset}: no such file (one class folder name per line)")
    try:
        classes = read_class_list(subset) if subset else None
    except ValueError as e:
        raise ConvertError(f"--subset {subset}: {str(e).removeprefix('class_list ' + repr(str(subset)) + ': ')}")
    source = scan(root, classes, allow_empty=skip_bad)
    if not source.files:
        raise ConvertError(f"{root}: no image files in its class folders")

    out.parent.mkdir(parents=True, exist_ok=True)  # after every check: a refused conversion creates nothing
    remove_stale(out.parent)  # what a killed conversion left here
    _remove(Path(f"{out}.tmp"), Path(f"{out}.json.tmp"))  # the same, named by fastft before the PID was in the name
    tmp, meta_tmp = Path(f"{out}.tmp-{os.getpid()}"), Path(f"{out}.json.tmp-{os.getpid()}")
    workers = num_workers if num_workers > 0 else (os.cpu_count() or 1)
    start = time.time()
    log_dir = tempfile.mkdtemp(prefix=f".fastft-convert-{os.getpid()}-", dir=out.parent)
    watch = None
    try:
        watch = _WorkerWatch()
        try:
            write_beton(tmp, _Images(source, log_dir), write_mode=write_mode, max_resolution=max_resolution,
                        jpeg_quality=jpeg_quality, compress_probability=compress_probability,
                        smart_threshold=smart_threshold, num_workers=min(workers, len(source.files)))
        except BaseException as e:
            watch.close()
            for p in multiprocessing.active_children():  # the writer's workers: they must not outlive us
                p.terminate()
            died = watch.died
            if died and isinstance(e, KeyboardInterrupt):
                raise ConvertError(f"a conversion worker died (pid {died[0][0]}, {died[0][1]}; out of memory?); "
                                   f"nothing written to {out}") from None
            raise
        finally:
            watch.close()
        if INTERRUPTED.is_set():  # the interrupt was swallowed somewhere: still, do not publish the output
            raise KeyboardInterrupt
        bad = _read_bad(log_dir)
        if bad and not skip_bad:
            lines = "\n".join(f"  {path}: {why}" for _, (path, why) in sorted(bad.items())[:10])
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise ConvertError(f"{len(bad)} file(s) are not readable images:\n{lines}{more}\n"
                               f"nothing written to {out}; pass --skip-bad to skip and count them")
        meta = {"format": META_FORMAT, "source": src, "root": str(source.root), "split": split,
                "classes": source.classes, "files": source.files, "bad": sorted(bad),
                "empty_classes": source.empty_classes, "write_mode": write_mode,
                "max_resolution": max_resolution, "jpeg_quality": jpeg_quality}
        meta_tmp.write_text(json.dumps(meta))
        _remove(Path(f"{out}.json"))  # never pair a new .beton with an old sidecar
        os.replace(tmp, out)
        os.replace(meta_tmp, Path(f"{out}.json"))
    finally:
        if watch is not None:
            watch.close()
        _remove(tmp, meta_tmp)
        shutil.rmtree(log_dir, ignore_errors=True)
    skipped = [v for _, v in sorted(bad.items())]
    return ConvertResult(out, len(source.files) - len(bad), skipped, len(source.classes), time.time() - start)
