"""Process-group helpers. With no process group (one process) they reduce to the identity.

Launch with torchrun: it sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; `setup()` joins the group with
NCCL on CUDA (one process per GPU, bound by LOCAL_RANK) or gloo on the CPU.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """A store whose keys belong to this restart attempt alone, or None to let torch pick one.

    torchrun's c10d rendezvous keeps one TCPStore for the whole job and hands it to every attempt without a
    per-attempt prefix, so after `--max-restarts` brings workers back, a rank can read the dead attempt's
    gloo/NCCL address and fail with "Connection refused" (pytorch/pytorch#135712). On one node the restart
    count is the same in every worker and makes a safe prefix; across nodes it is counted per agent and may
    differ, so there the fix is torch's own switch, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see the README).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # static rendezvous, or the shared store switched off: a fresh store per attempt
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("RANK") == "0":
            print("fastft: warning: multi-node elastic restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the "
                  "environment of every torchrun (torch's shared store keeps a dead attempt's addresses)",
                  flush=True)
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"fastft/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def setup(device: torch.device, timeout_s: float = 1800) -> Dist:
    """Join the torchrun process group if one was launched; bind this process to its GPU."""
    if launched_world_size() <= 1 or is_dist():
        return Dist(rank(), world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=timeout_s)
    store = _attempt_store(timeout)
    where = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]),
                                      "world_size": launched_world_size()}
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device, **where)
    else:
        dist.init_process_group("gloo", timeout=timeout, **where)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (rank order). No gradient flows through."""
    if not is_dist() or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order."""
    if not is_dist() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_dist() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of `module` from rank `src` to all ranks."""
    if not is_dist() or world_size() == 1:
        return
    for t in module.state_dict().values():
        dist.broadcast(t, src=src)


def no_buffer_sync() -> dict[str, bool]:
    """DistributedDataParallel's argument for "do not broadcast buffers before each forward". torch 2.14 renamed
    broadcast_buffers to forward_sync_buffers (the old name warns on every rank); the new one still syncs them once
    at construction, which changes nothing after broadcast_module. Older torch knows only the old name."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_dist() or world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


def _draw_permutation(n: int, device: torch.device) -> torch.Tensor:
    """One permutation of the global batch, drawn on rank 0 (from its torch RNG) and broadcast: both shuffle
    paths draw it the same way, so they encode the same keys."""
    perm = torch.randperm(n, device=device) if is_main() else torch.empty(n, dtype=torch.long, device=device)
    dist.broadcast(perm, src=0)
    return perm


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffle-BN by all-gather (`model.key_bn: shuffle_gather`): gather the global batch, give each rank
    a random slice of it (permutation chosen on rank 0 and broadcast), so a key's BN statistics are not those of
    its own query's batch. Returns this rank's slice and the permutation that undoes it (for `batch_unshuffle`).
    Every rank receives the whole global batch: (W - 1) local batches per step. Equal batch sizes on every rank."""
    if not is_dist() or world_size() == 1:
        return x, torch.arange(x.shape[0], device=x.device)
    x_all = all_gather_cat(x)
    perm = _draw_permutation(x_all.shape[0], x.device)
    mine = perm.view(world_size(), -1)[rank()]
    return x_all[mine], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, unshuffle: torch.Tensor) -> torch.Tensor:
    """Inverse of `batch_shuffle`: each rank gets back the outputs of its own original samples."""
    if not is_dist() or world_size() == 1:
        return x
    x_all = all_gather_cat(x)
    return x_all[unshuffle.view(world_size(), -1)[rank()]]


@dataclass
class ShufflePlan:
    """Who sends which rows to whom in `shuffle_a2a`, and back in `unshuffle_a2a`.

    The global batch is every rank's batch in rank order (sample g); `perm` lists it in shuffled order
    (position j holds sample perm[j]), and rank d encodes positions [start_d, start_d + size_d): as many as it
    holds, so the gather path's slices when the sizes are equal.
    """
    rows: torch.Tensor  # this rank's local rows to send, in position order (so grouped by destination rank)
    send: list[int]  # how many of them go to each rank
    recv: list[int]  # how many rows this rank's share receives from each rank
    order: torch.Tensor  # where each received row (grouped by source rank) sits in this rank's share


def shuffle_plan(perm: torch.Tensor, sizes: list[int], me: int) -> ShufflePlan:
    """The exchange that gives rank `me` positions [start_me, start_me + sizes[me]) of `perm`, pure arithmetic
    on the broadcast permutation (every rank computes every rank's view of it the same way)."""
    ends = torch.tensor(sizes, device=perm.device).cumsum(0)
    starts = ends - torch.tensor(sizes, device=perm.device)
    owner = torch.searchsorted(ends, perm, right=True)  # the rank holding sample perm[j]
    share = torch.searchsorted(ends, torch.arange(len(perm), device=perm.device), right=True)  # encoding rank of j
    world = len(sizes)
    outgoing = owner == me
    rows = perm[outgoing] - starts[me]
    send = torch.bincount(share[outgoing], minlength=world).tolist()
    sources = owner[starts[me]:ends[me]]
    recv = torch.bincount(sources, minlength=world).tolist()
    order = torch.argsort(sources, stable=True)  # received rows come grouped by source, each group in j order
    return ShufflePlan(rows, send, recv, order)


def _empty_as(x: torch.Tensor, n: int) -> torch.Tensor:
    """n rows shaped and laid out as `x`'s (channels-last stays channels-last: the encoder must see the same
    memory layout as on the gather path for its keys to be bit-identical)."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


def _exchange(x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send)
    return out


@torch.no_grad()
def shuffle_a2a(x: torch.Tensor) -> tuple[torch.Tensor, ShufflePlan | None]:
    """Shuffle-BN by all-to-all (`model.key_bn: shuffle`): the same permutation and the same shares as
    `batch_shuffle`, but each rank sends each of its rows only to the rank that encodes it, so a rank receives
    about (W - 1) / W of one local batch per step at any world size, instead of W - 1 batches. Batch sizes may
    differ between ranks (a last partial batch): each rank encodes as many rows as it holds."""
    if not is_dist() or world_size() == 1:
        return x, None
    sizes = all_gather_cat(torch.tensor([x.shape[0]], device=x.device)).tolist()
    plan = shuffle_plan(_draw_permutation(sum(sizes), x.device), sizes, rank())
    received = _exchange(x[plan.rows], plan.send, plan.recv)
    mine = _empty_as(x, received.shape[0])
    mine[plan.order] = received
    return mine, plan


@torch.no_grad()
def unshuffle_a2a(x: torch.Tensor, plan: ShufflePlan | None) -> torch.Tensor:
    """Inverse of `shuffle_a2a`: the outputs go back to the ranks (and rows) their inputs came from."""
    if plan is None:
        return x
    received = _exchange(x[plan.order], plan.recv, plan.send)
    out = _empty_as(x, received.shape[0])
    out[plan.rows] = received
    return out
