"""`fastft-bench ddp`: what a training step sends between ranks, measured, and what that costs at scale.

W gloo processes on the CPU each run the real Trainer step (Trainer.train_epoch on a synthetic batch) under
each `model.key_bn`. The bench alone installs a counter around the torch.distributed calls the step makes
(all_gather, all_to_all_single, all_reduce, broadcast) and a DDP communication hook around the gradient
all-reduce; each call is timed and its bytes are counted from the tensors handed to it: the bytes this rank
receives from the others (all_gather: W - 1 inputs; all_to_all_single: the rows of the other ranks' splits;
broadcast: the tensor, on every rank but the source; all_reduce: the ring's 2 (W - 1) / W x the tensor). The
measured collectives then go through the scaling model (fastft/bench/scaling.py) for W = 8, 64 and 256.
"""
from __future__ import annotations

import inspect
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from fastft.atomic import write_json
from fastft.config import Config

from .report import _table
from .scaling import Cluster, Collective, predict
from .step import HeldBatches, make_trainer
from .timing import TimedLoader

KEY_BNS = ("shuffle", "shuffle_gather", "sync")
WORLDS = (8, 64, 256)  # what the scaling model predicts
COUNTED = {"all_gather": "all_gather", "all_to_all_single": "all_to_all", "all_reduce": "all_reduce",
           "broadcast": "broadcast"}  # torch.distributed call -> its scaling law (fastft/bench/scaling.py)
DDP_LABEL = "gradient all-reduce (DDP, overlaps backward)"


@dataclass
class Tally:
    """One kind of call (by label) over the counted steps."""
    law: str
    per_sample: bool
    calls: int = 0
    payload: int = 0  # bytes handed to the calls, summed
    received: float = 0.0  # bytes this rank received from the others, summed
    seconds: float = 0.0
    last_bucket: int = 0  # DDP: bytes of the last bucket of each backward, summed


def _caller() -> str:
    """Where in fastft the call was made: the two innermost fastft functions (outside the bench), after
    "backward" when autograd made it (SyncBN's gradient all-reduce, from loss.backward())."""
    names, f, backward = [], sys._getframe(2), False
    while f is not None and len(names) < 2:
        module = f.f_globals.get("__name__", "")
        if module.startswith("fastft.") and not module.startswith("fastft.bench"):
            names.append(f.f_code.co_qualname)
        elif not names and f.f_code.co_name == "backward":
            backward = True
        f = f.f_back
    return " < ".join((["backward"] if backward else []) + names)


class CommCounter:
    """Counts and times the collectives of the step. `install` swaps the torch.distributed functions for counting
    ones (fastft calls them through the module, so it sees these), `uninstall` puts torch's back."""

    def __init__(self, batch: int):
        self.batch = batch
        self.tallies: dict[str, Tally] = {}
        self.counting = False  # only inside the window of timed steps (not epoch-end flushes)
        self._requests = 0
        self._real: dict[str, Callable] = {}

    def window(self, steps: int) -> Callable[[], None]:
        """TimedLoader's on_request: counts from the first batch request to the one after the last step."""
        self._requests = 0

        def on_request() -> None:
            self._requests += 1
            self.counting = self._requests <= steps
        return on_request

    def add(self, label: str, law: str, per_sample: bool, payload: int, received: float, seconds: float,
            last_bucket: int = 0) -> None:
        t = self.tallies.setdefault(label, Tally(law, per_sample))
        t.calls += 1
        t.payload += payload
        t.received += received
        t.seconds += seconds
        t.last_bucket += last_bucket

    def install(self) -> None:
        for name in COUNTED:
            self._real[name] = getattr(dist, name)
            setattr(dist, name, self._counting(name, self._real[name]))

    def uninstall(self) -> None:
        for name, real in self._real.items():
            setattr(dist, name, real)
        self._real = {}

    def _counting(self, name: str, real: Callable) -> Callable:
        signature = inspect.signature(real)

        def counted(*args, **kwargs):
            a = signature.bind(*args, **kwargs).arguments
            if a.get("async_op") or not self.counting:  # async: DDP's buckets, counted by ddp_hook
                return real(*args, **kwargs)
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            seconds = time.perf_counter() - t0
            payload, received, rows = self._bytes(name, a)
            world = dist.get_world_size(a.get("group"))
            self.add(f"{name}: {_caller()}", COUNTED[name], rows in (self.batch, world * self.batch), payload,
                     received, seconds)
            return out

        return counted

    @staticmethod
    def _bytes(name: str, a: dict) -> tuple[int, float, int]:
        """(payload bytes, bytes received from the other ranks, rows of the payload) of one call."""
        world, me = dist.get_world_size(a.get("group")), dist.get_rank(a.get("group"))
        t = a["input"] if name == "all_to_all_single" else a["tensor"]
        nbytes, rows = t.numel() * t.element_size(), (t.shape[0] if t.dim() else 1)
        if name == "all_gather":
            return nbytes, (world - 1) * nbytes, rows
        if name == "all_to_all_single":
            out, splits = a["output"], a.get("output_split_sizes")
            row = out.numel() * out.element_size() / max(out.shape[0], 1)
            others = sum(splits) - splits[me] if splits else (world - 1) / world * out.shape[0]
            return nbytes, others * row, rows
        if name == "broadcast":
            return nbytes, 0.0 if me == a.get("src", 0) else float(nbytes), rows
        return nbytes, 2 * (world - 1) / world * nbytes, rows  # all_reduce, as a ring

    def ddp_hook(self, state, bucket):
        """DDP's own all-reduce of one gradient bucket (default_hooks.allreduce_hook), counted and timed from the
        moment DDP hands the bucket over until it is reduced."""
        t0 = time.perf_counter()
        buf = bucket.buffer()
        nbytes, world = buf.numel() * buf.element_size(), dist.get_world_size()
        last = nbytes if bucket.is_last() else 0

        def done(fut):
            if self.counting:
                self.add(DDP_LABEL, "ddp_all_reduce", False, nbytes, 2 * (world - 1) / world * nbytes,
                         time.perf_counter() - t0, last)
            return fut.value()

        return default_hooks.allreduce_hook(state, bucket).then(done)

    def per_step(self, steps: int) -> dict[str, dict]:
        return {label: {**asdict(t), "calls": t.calls / steps, "payload": t.payload / max(t.calls, 1),
                        "received": t.received / steps, "seconds": t.seconds / steps,
                        "last_bucket": t.last_bucket / steps}
                for label, t in self.tallies.items()}


def _worker(rank: int, world: int, port: int, cfg: Config, out: Path, warmup: int, steps: int, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    source = HeldBatches.synthetic(cfg, torch.device("cpu"))
    trainer = make_trainer(cfg, source)  # joins the gloo group
    counter = CommCounter(cfg.loader.batch_size)
    trainer.model.encode_query.__self__.register_comm_hook(None, counter.ddp_hook)  # the DDP wrapper (MoCo.use_ddp)
    counter.install()
    try:
        trainer.train_epoch(source, warmup)  # includes DDP's bucket rebuild after its first step
        timed = TimedLoader(source, 0, steps, lambda: None, counter.window(steps))
        trainer.train_epoch(timed, len(timed))
    finally:
        counter.uninstall()
        trainer.log.close()
    write_json(out / f"rank{rank}.json", {"step_ms": 1000 * timed.elapsed / steps,
                                          "collectives": counter.per_step(steps)})
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mean(rows: list[dict], key: str) -> float:
    return sum(r.get(key, 0.0) for r in rows) / len(rows)


def measure(cfg: Config, world: int, warmup: int, steps: int, threads: int = 1) -> dict:
    """One key_bn (the config's) at `world` gloo processes: per collective label, the per-step means over ranks,
    and each rank's step time."""
    with tempfile.TemporaryDirectory(prefix="fastft-bench-ddp-") as tmp:
        out = Path(tmp)
        cfg = replace(cfg, run=replace(cfg.run, out_dir=str(out / "run"), device="cpu", progress=False))
        mp.spawn(_worker, args=(world, _free_port(), cfg, out, warmup, steps, threads), nprocs=world, join=True)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    labels = sorted({label for r in ranks for label in r["collectives"]})
    collectives = {}
    for label in labels:
        rows = [r["collectives"].get(label, {}) for r in ranks]
        first = next(row for row in rows if row)
        collectives[label] = {"law": first["law"], "per_sample": first["per_sample"],
                              **{k: _mean(rows, k) for k in ("calls", "payload", "received", "seconds", "last_bucket")},
                              "received_max": max(row.get("received", 0.0) for row in rows)}
    return {"world": world, "step_ms": [r["step_ms"] for r in ranks], "collectives": collectives}


def image_batch_bytes(cfg: Config) -> int:
    """One local batch of key images as the loaders hand it over (float32)."""
    return cfg.loader.batch_size * 3 * cfg.data.image_size ** 2 * 4


def bench_ddp(cfg: Config, world: int, key_bns: tuple[str, ...], warmup: int, steps: int, threads: int = 1) -> dict:
    return {"world": world, "batch": cfg.loader.batch_size, "image_batch_bytes": image_batch_bytes(cfg),
            "steps": steps, "warmup": warmup,
            "key_bn": {k: measure(replace(cfg, model=replace(cfg.model, key_bn=k)), world, warmup, steps, threads)
                       for k in key_bns}}


def as_collectives(measured: dict) -> list[Collective]:
    return [Collective(label, c["law"], c["calls"], c["payload"], measured["world"], c["per_sample"],
                       c["last_bucket"]) for label, c in measured["collectives"].items()]


def shuffle_bytes(measured: dict) -> float:
    """Bytes per rank per step of the shuffle-BN exchange (images out, keys back, sizes, permutation)."""
    return sum(c["received"] for label, c in measured["collectives"].items() if "shuffle" in label)


def report(results: dict, cluster: Cluster, model_batch: int) -> str:
    img = results["image_batch_bytes"]
    out = [f"measured: {results['world']} gloo processes on the CPU, batch {results['batch']} per rank, "
           f"{results['steps']} steps after {results['warmup']}; bytes = received from the other ranks, per rank "
           f"per step (mean over ranks); one local batch of key images = {img / 1e6:.3f} MB"]
    for key_bn, m in results["key_bn"].items():
        rows = [[label, f"{c['calls']:.2f}", f"{c['payload'] / 1e3:.1f}", f"{c['received'] / 1e3:.1f}",
                 f"{c['received'] / img:.3f}", f"{1000 * c['seconds']:.2f}"]
                for label, c in m["collectives"].items()]
        rows.append(["shuffle-BN exchange, all of it", "", "", f"{shuffle_bytes(m) / 1e3:.1f}",
                     f"{shuffle_bytes(m) / img:.3f}", ""])
        step_ms = sum(m["step_ms"]) / len(m["step_ms"])
        out.append(f"\nkey_bn: {key_bn} (step {step_ms:.0f} ms on this machine)\n\n" + _table(
            ["collective: where", "calls/step", "KB per call", "KB received/step", "x image batch", "ms/step"], rows))
    rows = []
    scale = model_batch / results["batch"]
    for key_bn, m in results["key_bn"].items():
        for c in as_collectives(m):
            rows.append([key_bn, c.label, c.law + (", per sample" if c.per_sample else ""),
                         *(f"{c.calls * c.bytes_at(w, scale) / 1e6:.2f}" for w in WORLDS)])
    out.append(f"\nMB received per rank per step at {model_batch} images per GPU, by each collective's law\n\n"
               + _table(["key_bn", "collective: where", "law", *(f"{w} GPUs" for w in WORLDS)], rows))
    rows = []
    for key_bn, m in results["key_bn"].items():
        for w in WORLDS:
            p = predict(as_collectives(m), w, model_batch, cluster, measured_batch=results["batch"])
            rows.append([key_bn, str(w), f"{p.bytes_per_rank / 1e6:.1f}", f"{1000 * p.exposed_s:.2f}",
                         f"{1000 * p.step_s:.2f}", f"{p.efficiency:.1%}"])
    out.append(f"\nscaling model (fastft/bench/scaling.py): {model_batch} images per GPU at "
               f"{cluster.images_per_s:.0f} images/s on one GPU, {cluster.gpus_per_node} GPUs per node on NVLink "
               f"({cluster.nvlink_bytes_per_s / 1e9:.0f} GB/s), {cluster.net_bytes_per_s / 1e9:.0f} GB/s per GPU "
               f"between nodes, DDP's gradient all-reduce overlapping backward ({cluster.backward_share:.0%} of the "
               f"step)\n\n" + _table(["key_bn", "GPUs", "MB per rank per step", "exposed comm ms", "step ms",
                                    "efficiency"], rows))
    return "\n".join(out)
