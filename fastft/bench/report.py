"""The record of a `fastft-bench` run: its tables, the machine and versions, the setup line and the verdict.

Verdict: `data` when end to end runs below 90% of model-only (or, without `train`, when the loader alone is
slower than the model); otherwise `kernel` when the loss kernel's forward + backward takes at least half of a
model step, else `model`. The ratios that decided it are printed with it.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from fastft.config import Config

from .step import PHASES

DATA_RATIO = 0.9  # end to end below this fraction of model-only: data-bound (the project's speed target)
KERNEL_SHARE = 0.5  # the loss kernel taking at least this share of a model step: kernel-bound


# -- tables ---------------------------------------------------------------------------------------------------


def _runs(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def tables(results: dict) -> str:
    out = []
    if "loader" in results:
        rows = []
        for name, r in results["loader"]["backends"].items():
            x = results["loader"]["speedup"].get(name, float("nan"))
            rows.append([name, f"{r['images_per_s']:.1f}", f"{r['views_per_s']:.1f}", f"{x:.2f}",
                         f"{r['images_per_cpu_s']:.1f}", _runs(r["runs"])])
        out.append(_table(["loader backend", "images/s", "views/s", f"x {results['loader']['baseline']}",
                           "images per CPU-second",
                           "runs (images/s)"], rows))
    if "model" in results:
        labels = {"model": "model-only (synthetic batch on the device)"}
        if "train" in results:
            t = results["train"]
            labels["train"] = f"end to end ({t['backend']} loader, {t['workers']} workers)"
        rows = []
        for name, label in labels.items():
            r = results[name]
            rows.append([label, f"{r['images_per_s']:.1f}", f"{r['views_per_s']:.1f}", f"{r['step_ms']:.1f}",
                         f"{r['data_wait_fraction']:.1%}", f"{r['warmup']} + {r['steps']}",
                         _runs(r["runs_images_per_s"])])
        out.append(_table(["training step", "images/s", "views/s", "ms/step", "waiting for data",
                           "steps (warm-up + timed)", "runs (images/s)"], rows))
    if "step" in results:
        st = results["step"]
        rows = [[name, f"{st['phases_ms'][name]:.2f}", f"{st['phases_ms'][name] / st['step_ms']:.1%}"]
                for name in PHASES]
        rows.append(["between steps (batch, lr)", f"{st['outside_phases_ms']:.2f}",
                     f"{st['outside_phases_ms'] / st['step_ms']:.1%}"])
        rows.append(["whole step", f"{st['step_ms']:.2f}", "100%"])
        out.append(_table(["step phase (clocked)", "ms", "share"], rows))
    if "kernel" in results:
        k = results["kernel"]
        rows = [[name, str(k["N"]), str(k["K"]), str(k["C"]), str(k["interpolate"]), k["queue_dtype"],
                 f"{r['fwd_bwd_ms']:.3f}", f"{r['speedup_vs_torch']:.2f}",
                 "yes" if name == k["used_by_training"] else ""] for name, r in k["impls"].items()]
        out.append(_table(["loss kernel", "N", "K", "C", "interpolate", "queue", "fwd+bwd ms", "x torch",
                           "used by training"], rows))
    if "scores" in results:
        sc = results["scores"]
        rows = []
        for name, v in sc["variants"].items():
            cost = ([f"{v['vs_off']:+.1%}", f"{v['observe_ms']:.3f}", f"{v['flush_ms']:.2f}",
                     f"{v['flush_per_step_ms']:.4f}", f"{v['share_of_step']:.2%}"] if "observe_ms" in v
                    else ["", "", "", "", ""])
            rows.append([name, f"{v['step_ms']:.1f}", *cost, _runs(v["runs_step_ms"])])
        out.append(_table(["score logging", "ms/step", "vs off", "observe + commit ms",
                           f"flush ms (every {sc['flush_every']} steps)", "flush per step ms", "share of a step",
                           "runs (ms/step)"], rows)
                   + f"\n\nshare = (observe + commit + flush / scores.flush_every) / the step without logging; "
                     f"{sc['batches']} real batches held in memory (no data loading in the step)")
    return "\n\n".join(out)


# -- the machine ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def describe(cfg: Config, device: torch.device, dtype: torch.dtype | None = None) -> str:
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else cfg.run.precision
    return (f"{cfg.model.arch}{' small stem' if cfg.model.small_stem else ''} at {cfg.data.image_size}, batch "
            f"{cfg.loader.batch_size}, {dtype_name}, {'channels-last' if cfg.run.channels_last else 'NCHW'}, queue "
            f"{cfg.model.queue_size} x {cfg.model.dim} ({cfg.loss.queue_dtype}), FT pos={cfg.ft.pos} neg={cfg.ft.neg}, "
            f"loader {cfg.loader.backend} x {cfg.loader.workers} workers, data {cfg.data.path}, device {device}")


def report(record: dict, body: str | None = None) -> str:
    """The header lines, then `body` (default: the tables and the verdict)."""
    m = record["machine"]
    lines = [f"# {record['command']}",
             f"# {record['date']}: {m['cpu']}, {m['cores']} cores (torch {m['torch_threads']} threads)"
             + (f", {m['gpu']}" if m.get("gpu") else "")
             + f"; load average {m['load_average_before']:.2f} before, {m['load_average_after']:.2f} after",
             f"# torch {record['versions']['torch']}, torchvision {record['versions']['torchvision']}, "
             f"triton {record['versions']['triton']}; {record['setup']}",
             ""]
    if body is not None:
        return "\n".join([*lines, body])
    lines[-1:-1] = [f"# medians of {record['settings']['repeats']} interleaved runs (each candidate once untimed first); "
                    f"runs through a real loader skip and time whole waves of its workers' batches; an image = two views"]
    lines += [tables(record["results"]), ""]
    lines += [f"note: {n}" for n in record["notes"]]
    lines.append(record["verdict"]["text"])
    return "\n".join(lines)


# -- the verdict ----------------------------------------------------------------------------------------------


def verdict(results: dict) -> dict:
    """{"bottleneck": "data" | "model" | "kernel" | None, "ratios": {...}, "text": one line}."""
    ratios: dict[str, float] = {}
    reasons: list[str] = []
    model = results.get("model")
    step_ms = model["step_ms"] if model else results.get("step", {}).get("step_ms")
    if "train" in results:
        ratios["train_over_model"] = results["train"]["images_per_s"] / model["images_per_s"]
        ratios["data_wait_fraction"] = results["train"]["data_wait_fraction"]
        reasons.append(f"end to end {ratios['train_over_model']:.2f}x model-only "
                       f"({ratios['data_wait_fraction']:.0%} of step time waiting for data)")
        gap = 1 - ratios["train_over_model"]
        if gap > 1 - DATA_RATIO and ratios["data_wait_fraction"] < gap / 2:
            # Slower without waiting: the loader's processes take CPU from the step (or the machine was noisy).
            reasons.append("most of the gap is not waiting: loading competes with the step for the CPU")
    loader = results.get("loader", {}).get("backends", {})
    if loader and model:
        name = max(loader, key=lambda b: loader[b]["images_per_s"])
        ratios["loader_over_model"] = loader[name]["images_per_s"] / model["images_per_s"]
        reasons.append(f"fastest loader alone ({name}) {loader[name]['images_per_s']:.0f} img/s = "
                       f"{ratios['loader_over_model']:.2f}x the model's {model['images_per_s']:.0f}")
    kernel = results.get("kernel")
    if kernel and step_ms:
        k_ms = kernel["impls"][kernel["used_by_training"]]["fwd_bwd_ms"]
        ratios["kernel_share_of_step"] = k_ms / step_ms
        reasons.append(f"loss kernel ({kernel['used_by_training']}) {k_ms:.2f} ms = "
                       f"{ratios['kernel_share_of_step']:.1%} of a {step_ms:.1f} ms model step")

    if "train_over_model" in ratios:
        data_bound = ratios["train_over_model"] < DATA_RATIO
    else:
        data_bound = ratios.get("loader_over_model", float("inf")) < 1.0
    if data_bound:
        bottleneck, hint = "data", "more loader.workers or a faster loader.backend"
    elif "kernel_share_of_step" in ratios and ratios["kernel_share_of_step"] >= KERNEL_SHARE:
        bottleneck, hint = "kernel", "loss.kernel, loss.queue_dtype"
    elif step_ms:
        bottleneck, hint = "model", "compute-bound: run.precision, run.channels_last, run.compile"
    else:
        return {"bottleneck": None, "ratios": ratios,
                "text": "verdict: none (needs the model step: modes model, step, train or all)"}
    missing = [m for m, have in (("data", "train" in results or bool(loader)), ("kernel", "kernel" in results))
               if not have]
    text = f"verdict: {bottleneck}" + (f" -- {'; '.join(reasons)}" if reasons else "") + f" [{hint}]"
    if missing:
        text += f" (not measured: {', '.join(missing)}; mode all measures everything)"
    return {"bottleneck": bottleneck, "ratios": ratios, "text": text}
