"""Where the CPU time of the loaders goes: each step of two MoCo v2 views timed alone, on one thread.

    python scripts/cpu_steps.py                                  # 64 generated 500x375 photo-like JPEGs, 224 views
    python scripts/cpu_steps.py --images /data/imagenet/train --limit 256 --repeats 7

Prints a markdown table (BENCHMARKS.md, "Where the CPU time goes"): milliseconds per image for decodes, per view
for the rest, medians of --repeats passes over the same images. The DALI rows need the `dali` extra; the numba
rows need numba (the `dali` and `ffcv` extras). `fastft-bench loader` measures the loaders whole; this shows
which step to work on.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

AUG = "mocov2"  # the recipe whose steps are timed


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", help="a folder of JPEGs (searched recursively; default: generated ones)")
    ap.add_argument("--limit", type=positive, default=64, help="at most this many images (default 64)")
    ap.add_argument("--size", type=positive, default=224, help="view size (default 224)")
    ap.add_argument("--repeats", type=positive, default=5, help="timed passes; the table shows medians (default 5)")
    return ap


def median_ms(fn: Callable[[], None], count: int, repeats: int) -> float:
    """Milliseconds per item: fn processes `count` items; one untimed pass, then the median of `repeats`."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times) / count


def jpeg_files(folder: str | None, limit: int, scratch: str) -> list[Path]:
    if folder is None:
        from fastft.pipelines.synthetic import write_synthetic_folder

        folder = str(write_synthetic_folder(Path(scratch) / "jpegs", limit, unique=limit))
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    if not files:
        raise SystemExit(f"cpu_steps: no .jpg or .jpeg file under {folder}")
    return files


def torch_rows(data: list[torch.Tensor], size: int, repeats: int) -> tuple[list[tuple[str, str, float]], list]:
    """torchvision's decode and torch's crop + antialiased resize (the nvjpeg backend's CPU path)."""
    from torchvision.io import decode_jpeg

    from fastft.pipelines import crops
    from fastft.pipelines.augment import crop_step

    images = [decode_jpeg(d) for d in data]
    hw = torch.tensor([im.shape[1:] for im in images])
    crop = crop_step(AUG).params
    boxes = crops.crop_boxes(hw, crop["scale"], crop["ratio"], torch.Generator().manual_seed(0))
    owner = torch.arange(len(images))
    views = crops.resize_crops(images, boxes, owner, size, "interpolate")
    rows = [("JPEG decode, torchvision (libjpeg-turbo)", "image",
             median_ms(lambda: [decode_jpeg(d) for d in data], len(data), repeats)),
            ("crop + antialiased resize, torch uint8 (`F.interpolate(antialias=True)`)", "view",
             median_ms(lambda: crops.resize_crops(images, boxes, owner, size, "interpolate"), len(images), repeats))]
    return rows, views


def dali_rows(files: list[Path], size: int, repeats: int) -> list[tuple[str, str, float]]:
    """DALI's CPU decode, and its random_resized_crop (the dali backend's CPU graph) as the difference."""
    try:
        from nvidia.dali import fn, pipeline_def, types

        from fastft.pipelines.dali_loader import random_crop
    except ImportError:
        return []

    @pipeline_def
    def graph(crop: bool):
        jpegs, _ = fn.readers.file(files=[str(f) for f in files], random_shuffle=False)
        images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return (random_crop(images, AUG, size, 0.0), random_crop(images, AUG, size, 0.0)) if crop else images

    per = {}
    for crop in (False, True):
        pipe = graph(crop, batch_size=len(files), num_threads=1, device_id=None, seed=0)
        pipe.build()
        per[crop] = median_ms(pipe.run, len(files), repeats)
        del pipe
    return [("JPEG decode, DALI CPU", "image", per[False]),
            ("crop + antialiased resize, DALI CPU (`fn.random_resized_crop`)", "view", (per[True] - per[False]) / 2)]


def numba_rows(views: torch.Tensor, size: int, repeats: int) -> list[tuple[str, str, float]]:
    """The numba executor: its kernel with no step, one step, the MoCo v2 mix; then the normalisation."""
    try:
        import numba
    except ImportError:
        return []
    from fastft.pipelines import color_numba as cn
    from fastft.pipelines.augment import blur_kernel_size

    numba.set_num_threads(1)
    src, n = views.numpy(), len(views)
    augment_view, prog, taps = cn.kernels()[1], cn.program(AUG), blur_kernel_size(size)
    out = np.empty_like(src)

    def each(on: list[int], sigma: float = 2.0) -> Callable[[], None]:
        prm = np.zeros(cn.PARAMS, np.float32)
        prm[cn.P_B:cn.P_H + 1] = [1.2, 0.8, 1.2, 0.05]
        prm[cn.P_ORDER:cn.P_ORDER + 4] = [0, 1, 2, 3]
        prm[cn.P_SIGMA] = sigma
        prm[on] = 1.0
        return lambda: [augment_view(src[i], out[i], prm, prog, taps) for i in range(n)]

    def mix() -> None:
        batch = src.copy()
        cn.augment_batch(batch, AUG, size, threads=1)

    cn.seed(0)
    return [("colour kernel, no step (planes in and out)", "view", median_ms(each([]), n, repeats)),
            ("colour kernel, jitter (4 ops) only", "view", median_ms(each([cn.P_JITTER]), n, repeats)),
            ("colour kernel, blur only (sigma 2: 13 taps)", "view", median_ms(each([cn.P_BLUR]), n, repeats)),
            ("colour kernel, flip only", "view", median_ms(each([cn.P_FLIP]), n, repeats)),
            ("colour steps of MoCo v2, numba (jitter p 0.8, grayscale p 0.2, blur p 0.5, flip p 0.5; "
             "a copy of the batch included)", "view", median_ms(mix, n, repeats)),
            ("normalisation to float32, numba, into a fresh buffer", "view",
             median_ms(lambda: cn.normalize(views), n, repeats))]


def table(rows: list[tuple[str, str, float]]) -> str:
    lines = ["| step | per | ms |", "|---|---|---|"]
    lines += [f"| {name} | {per} | {ms:.3f} |" for name, per, ms in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        files = jpeg_files(args.images, args.limit, scratch)
        data = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
        rows, views = torch_rows(data, args.size, args.repeats)
        rows += dali_rows(files, args.size, args.repeats)
    rows += numba_rows(views, args.size, args.repeats)
    text = (f"# {len(files)} JPEGs, views {args.size}x{args.size}, one thread, medians of {args.repeats} passes\n\n"
            + table(rows))
    print(text)
    return text


if __name__ == "__main__":
    main()
