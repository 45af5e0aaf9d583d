"""The scaling model: from the collectives one training step issues (measured by `fastft-bench ddp`) to the step
time and scaling efficiency at W GPUs. Pure arithmetic, no torch; every assumption is a field of `Cluster`.

Per collective, the bytes each rank receives from the others at world size W, from the payload (the local tensor
handed to the call) measured at the bench's world size:

    all_gather       (W - 1) x payload                  every other rank's tensor
    all_to_all       (W - 1) / W x payload              a uniform exchange keeps 1/W at home
    all_reduce       2 (W - 1) / W x payload            ring: reduce-scatter, then all-gather
    broadcast        payload, which grows with W        per step, only the shuffle's permutation of the global batch

Time of one call: the latency (`latency_s`, x log2 W hops of a tree) plus bytes / bandwidth, the bandwidth of
NVLink while W fits in one node and of the network (per GPU) beyond. Everything blocks the step except DDP's
gradient all-reduce, which overlaps backward as DDP runs it: bucket by bucket while backward goes on, so only
what outlasts backward, or at least the last bucket (reduced after the last gradient is ready), is exposed.

    efficiency(W) = step_s / (step_s + exposed communication)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LAWS = ("all_gather", "all_to_all", "all_reduce", "broadcast", "ddp_all_reduce")


@dataclass(frozen=True)
class Collective:
    """One kind of call in a step, as measured: `payload` bytes per call handed to it at `world` ranks."""
    label: str
    law: str  # one of LAWS
    calls: float  # per step
    payload: float  # bytes per call, at `world`
    world: int
    per_sample: bool = False  # its payload is rows of the local (or global) batch: scales with the batch
    last_bucket: float = 0.0  # ddp_all_reduce: payload of the last bucket of backward

    def __post_init__(self):
        if self.law not in LAWS:
            raise ValueError(f"collective {self.label!r}: law {self.law!r} is not one of {', '.join(LAWS)}")

    def payload_at(self, world: int, batch_scale: float = 1.0) -> float:
        p = self.payload * (world / self.world if self.law == "broadcast" else 1.0)
        return p * (batch_scale if self.per_sample else 1.0)

    def bytes_at(self, world: int, batch_scale: float = 1.0) -> float:
        """Bytes each rank receives per call at `world` ranks."""
        p, w = self.payload_at(world, batch_scale), world
        return {"all_gather": (w - 1) * p, "all_to_all": (w - 1) / w * p, "broadcast": p if w > 1 else 0.0,
                "all_reduce": 2 * (w - 1) / w * p, "ddp_all_reduce": 2 * (w - 1) / w * p}[self.law]


@dataclass(frozen=True)
class Cluster:
    """The documented assumptions (README, "Scaling note"). Defaults: 8 GPUs per node on NVLink, 50 GB/s per GPU
    between nodes, the single-GPU step of 2,800 images/s, backward two thirds of the step."""
    images_per_s: float = 2800.0  # one GPU's training throughput (sets the step time at a batch)
    gpus_per_node: int = 8
    nvlink_bytes_per_s: float = 400e9
    net_bytes_per_s: float = 50e9  # per GPU, between nodes
    nvlink_latency_s: float = 5e-6  # per hop of a collective
    net_latency_s: float = 10e-6
    backward_share: float = 2 / 3  # of the step: the window DDP's all-reduce overlaps

    def bandwidth(self, world: int) -> float:
        return self.nvlink_bytes_per_s if world <= self.gpus_per_node else self.net_bytes_per_s

    def latency(self, world: int) -> float:
        hops = math.ceil(math.log2(world)) if world > 1 else 0
        return hops * (self.nvlink_latency_s if world <= self.gpus_per_node else self.net_latency_s)


@dataclass(frozen=True)
class Prediction:
    world: int
    step_s: float  # one GPU's step at the per-GPU batch
    exposed_s: float  # communication the step waits for
    bytes_per_rank: float  # received per step, all collectives
    by_label: dict  # label -> (bytes per rank per step, seconds per step, of which exposed)

    @property
    def efficiency(self) -> float:
        return self.step_s / (self.step_s + self.exposed_s)


def predict(step: list[Collective], world: int, batch: int, cluster: Cluster = Cluster(),
            measured_batch: int | None = None) -> Prediction:
    """One step's communication at `world` GPUs of `batch` images each. `measured_batch`: the per-rank batch the
    collectives were measured at (per-sample payloads scale by batch / measured_batch)."""
    scale = batch / (measured_batch or batch)
    step_s = batch / cluster.images_per_s
    backward_s = cluster.backward_share * step_s
    bw, lat = cluster.bandwidth(world), cluster.latency(world)
    exposed = total_bytes = 0.0
    by_label = {}
    for c in step:
        nbytes = c.calls * c.bytes_at(world, scale)
        seconds = c.calls * lat + nbytes / bw if world > 1 else 0.0
        if c.law == "ddp_all_reduce":  # overlaps backward; the last bucket always comes after it
            tail = seconds * c.last_bucket / (c.calls * c.payload) if c.payload else seconds
            waits = max(seconds - backward_s, tail) if world > 1 else 0.0
        else:
            waits = seconds
        by_label[c.label] = (nbytes, seconds, waits)
        exposed += waits
        total_bytes += nbytes
    return Prediction(world, step_s, exposed, total_bytes, by_label)

