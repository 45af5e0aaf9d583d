"""The record of a `fastft-bench` run: tables, the machine and versions, the JSON file."""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from fastft.pipelines.bench import cpu_model

from .bench_timing import PHASES
from .config import Config


def tables(results: dict) -> str:
    out = []
    if "loader" in results:
        rows = ["| loader backend | images/s | views/s | x torchvision | images per CPU-second | runs (images/s) |",
                "|---|---|---|---|---|---|"]
        for name, r in results["loader"]["backends"].items():
            x = results["loader"]["speedup"].get(name, float("nan"))
            rows.append(f"| {name} | {r['images_per_s']:.1f} | {r['views_per_s']:.1f} | {x:.2f} | "
                        f"{r['images_per_cpu_s']:.1f} | {', '.join(f'{v:.1f}' for v in r['runs'])} |")
        out.append("\n".join(rows))
    if "model" in results:
        rows = ["| training step | images/s | views/s | ms/step | waiting for data | steps (warm-up + timed) | "
                "runs (images/s) |", "|---|---|---|---|---|---|---|"]
        labels = {"model": "model-only (synthetic batch on the device)"}
        if "train" in results:
            t = results["train"]
            labels["train"] = f"end to end ({t['backend']} loader, {t['workers']} workers)"
        for name, label in labels.items():
            r = results[name]
            rows.append(f"| {label} | {r['images_per_s']:.1f} | {r['views_per_s']:.1f} | {r['step_ms']:.1f} | "
                        f"{r['data_wait_fraction']:.1%} | {r['warmup']} + {r['steps']} | "
                        f"{', '.join(f'{v:.1f}' for v in r['runs_images_per_s'])} |")
        out.append("\n".join(rows))
    if "step" in results:
        st = results["step"]
        rows = ["| step phase (clocked) | ms | share |", "|---|---|---|"]
        for name in PHASES:
            rows.append(f"| {name} | {st['phases_ms'][name]:.2f} | {st['phases_ms'][name] / st['step_ms']:.1%} |")
        rows.append(f"| between steps (batch, lr, logging) | {st['outside_phases_ms']:.2f} | "
                    f"{st['outside_phases_ms'] / st['step_ms']:.1%} |")
        rows.append(f"| whole step | {st['step_ms']:.2f} | 100% |")
        out.append("\n".join(rows))
    if "kernel" in results:
        k = results["kernel"]
        rows = ["| loss kernel | N | K | C | interpolate | queue | fwd+bwd ms | x torch | used by training |",
                "|---|---|---|---|---|---|---|---|---|"]
        for name, r in k["impls"].items():
            rows.append(f"| {name} | {k['N']} | {k['K']} | {k['C']} | {k['interpolate']} | {k['queue_dtype']} | "
                        f"{r['fwd_bwd_ms']:.3f} | {r['speedup_vs_torch']:.2f} | "
                        f"{'yes' if name == k['used_by_training'] else ''} |")
        out.append("\n".join(rows))
    return "\n\n".join(out)


def machine_info(device: torch.device) -> dict:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "gpu": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
    return info


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("torchvision", "triton", "numpy", "pillow", "ffcv", "numba"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    dali = sorted(f"{d.metadata['Name']} {d.version}" for d in metadata.distributions()
                  if (d.metadata["Name"] or "").lower().startswith("nvidia-dali"))
    out["dali"] = ", ".join(dali) or None
    return out


def write_json_atomic(path: Path, record: dict) -> None:
    """Temp file beside the target, fsync, rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def describe(cfg: Config, device: torch.device, trainer=None) -> str:
    dtype = str(trainer.dtype).removeprefix("torch.") if trainer is not None else cfg.run.precision
    return (f"{cfg.model.arch}{' small stem' if cfg.model.small_stem else ''} at {cfg.data.image_size}, batch "
            f"{cfg.loader.batch_size}, {dtype}, {'channels-last' if cfg.run.channels_last else 'NCHW'}, queue "
            f"{cfg.model.queue_size} x {cfg.model.dim} ({cfg.loss.queue_dtype}), FT pos={cfg.ft.pos} neg={cfg.ft.neg}, "
            f"loader {cfg.loader.backend} x {cfg.loader.workers} workers, data {cfg.data.path}, device {device}")


def report(record: dict) -> str:
    m = record["machine"]
    lines = [f"# {record['command']}",
             f"# {record['date']}: {m['cpu']}, {m['cores']} cores (torch {m['torch_threads']} threads)"
             + (f", {m['gpu']}" if m.get("gpu") else "")
             + f"; load average {m['load_average_before']:.2f} before, {m['load_average_after']:.2f} after",
             f"# torch {record['versions']['torch']}, torchvision {record['versions']['torchvision']}, "
             f"triton {record['versions']['triton']}; {record['setup']}",
             f"# medians of {record['settings']['repeats']} interleaved runs (each candidate once untimed first); runs "
             f"through a real loader skip and time whole waves of its workers' batches; an image = two views",
             "", tables(record["results"]), ""]
    lines += [f"note: {n}" for n in record["notes"]]
    lines.append(record["verdict"]["text"])
    return "\n".join(lines)
