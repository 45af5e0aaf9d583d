"""`fastft-convert-dataset SRC OUT.beton`: an ImageFolder tree or a built-in dataset -> an FFCV .beton file.

    fastft-convert-dataset /data/imagenet/train /data/in1k_train.beton
    fastft-convert-dataset /data/imagenet/train /data/in100_train.beton --subset configs/imagenet100.txt
    fastft-convert-dataset builtin:digits digits_val.beton --split val

The command only: arguments, signals, messages. The conversion itself is convert.py (which documents the
output); import that, never this module (an entry point).
"""
from __future__ import annotations

import argparse
import importlib.resources
import os
import signal
import sys
from pathlib import Path

from .convert import INTERRUPTED, WRITE_MODES, ConvertError, convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastft-convert-dataset", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="ImageFolder split (one folder per class), or builtin:digits")
    p.add_argument("out", help="the .beton file to write (OUT.beton.json is written beside it)")
    p.add_argument("--split", default="train", help="split of a builtin: dataset (train | val); default train")
    p.add_argument("--subset", metavar="CLASSLIST", help="keep only the classes listed in this file "
                   "(one folder name per line, # comments), e.g. configs/imagenet100.txt")
    p.add_argument("--max-resolution", type=int, default=None,
                   help="shrink images whose longer side exceeds this (default: keep their own resolution)")
    p.add_argument("--write-mode", default="smart", choices=WRITE_MODES,
                   help="raw pixels, jpg, proportion (jpg with --compress-probability) or smart (default: jpg "
                        "for images over 64x64, raw for smaller ones)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality for compressed images (default 90)")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="share of images stored as JPEG with --write-mode proportion (default 0.5)")
    p.add_argument("--num-workers", type=int, default=0, help="writer processes (default: one per CPU core)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) unreadable files and empty class folders instead of stopping")
    p.add_argument("--cache-dir", default="~/.cache/fastft", help="where built-in datasets are materialised")
    return p


def class_list(value: str | None) -> str | None:
    """--subset as given when that file exists, else the class list of that name that ships with fastft (its
    packaged configs, read as data: `configs/imagenet100.txt` or `imagenet100.txt` from any folder)."""
    if value is None or Path(value).expanduser().exists():
        return value
    packaged = Path(str(importlib.resources.files("fastft.configs")))
    name = Path(value).as_posix().removeprefix("configs/")
    return str(packaged / name) if (packaged / name).is_file() else value


def _on_signal(signum, frame):  # Ctrl-C, or a job scheduler's kill: clean up the same way
    INTERRUPTED.set()
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    INTERRUPTED.clear()
    # Restored on the way out: main() also runs inside other programs (a test runner) that keep going after it.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, _on_signal)
    if previous[signal.SIGINT] is not signal.SIG_IGN:  # keep "ignored" when a shell set it so
        signal.signal(signal.SIGINT, _on_signal)
    try:
        r = convert(args.src, args.out, split=args.split, subset=class_list(args.subset), max_resolution=args.max_resolution,
                    jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                    write_mode=args.write_mode, num_workers=args.num_workers, force=args.force,
                    skip_bad=args.skip_bad, cache_dir=args.cache_dir)
    except ConvertError as e:
        print(f"fastft-convert-dataset: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastft-convert-dataset: interrupted; {args.out} was not written", file=sys.stderr)
        if argv is None:
            # As a command, leave now (the output is already cleaned up): the interrupt can land while the
            # writer's multiprocessing queue holds its lock, and that queue's finalizer, run when this
            # exception's frames are freed, then waits on the lock for ever (seen: 1 run in 4 hung so).
            sys.stderr.flush()
            os._exit(130)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    size = r.out.stat().st_size / 2**20
    print(f"wrote {r.written} images of {r.classes} classes to {r.out} ({size:.1f} MiB) in {r.seconds:.1f} s"
          + (f"; skipped {len(r.skipped)} unreadable" if r.skipped else ""))
    for path, why in r.skipped[:10]:
        print(f"  skipped {path}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
