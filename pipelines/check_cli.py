"""`fastft-check-dataset DIR`: every image file under DIR that cannot be read (corrupt, truncated, not an image,
empty), listed before a long run rather than met during it.

    fastft-check-dataset /data/imagenet                 # train/ and val/ alike
    fastft-check-dataset /data/imagenet/train --json bad.json --workers 16

Image files are those with an image extension (the ones ImageFolder and fastft-convert-dataset read); each is
decoded whole (JPEGs at 1/8 scale: every byte is still read) by the judge every loader uses
(bad_images.check_image). Exit status: 0 all read, 1 some do not, 2 DIR is not a folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .bad_images import IMAGE_EXTENSIONS, find_bad


def image_files(root: Path) -> list[str]:
    return sorted(str(Path(folder) / name) for folder, _, names in os.walk(root) for name in names
                  if Path(name).suffix.lower() in IMAGE_EXTENSIONS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fastft-check-dataset", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="a folder of images: an ImageFolder root, a split, or any tree")
    ap.add_argument("--workers", type=int, default=0, help="decoding threads (default: one per CPU core)")
    ap.add_argument("--json", metavar="OUT", help="also write the list as JSON: {root, images, unreadable: "
                                                  "[{path, reason}]}")
    args = ap.parse_args(argv)
    root = Path(args.dir).expanduser()
    if not root.is_dir():
        print(f"fastft-check-dataset: error: {args.dir}: no such folder", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    files = image_files(root)
    bad = find_bad(files, args.workers)
    for path, reason in bad:
        print(f"{path}: {reason}")
    took = time.perf_counter() - t0
    print(f"{len(bad)} of {len(files)} images are unreadable under {root} ({took:.1f} s)" if bad else
          f"all {len(files)} images under {root} read ({took:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"root": str(root), "images": len(files), "unreadable": [
            {"path": p, "reason": r} for p, r in bad]}, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
