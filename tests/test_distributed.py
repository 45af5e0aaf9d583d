"""DDP on the CPU with gloo: torchrun with 2 processes, 2 "nodes" on 127.0.0.1, elastic restart."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from fastft import checkpoint as ckpt_io
from fastft.metrics import read_metrics

ROOT = Path(__file__).parent.parent
PROBE = str(Path(__file__).parent / "ddp_probe.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, extra: tuple = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv_backend",
            "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", *extra, *args]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("ddp")
    ov = tiny_overrides(out, data_cache, **{"optim.epochs": 1, "run.steps_per_epoch": 4, "model.queue_size": 20})
    proc = run(torchrun(PROBE, "train", str(out), *ov))
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # no deprecation warnings from our calls, on any rank
    return [torch.load(out / f"probe_train_w2_rank{r}.pt", weights_only=False) for r in (0, 1)], out


def test_ranks_stay_identical_and_queue_holds_gathered_keys(two_rank_run):
    (r0, r1), out = two_rank_run
    assert r0["world"] == r1["world"] == 2
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    assert torch.equal(r0["queue"], r1["queue"]) and r0["ptr"] == r1["ptr"] == (4 * 2 * 16) % 20
    # Each step's gathered keys are rank 0's keys then rank 1's, and the queue is those keys written in order.
    queue = r0["queue0"].clone()
    ptr = 0
    for step, (g0, g1) in enumerate(zip(r0["gathered"], r1["gathered"])):
        assert torch.equal(g0, g1)
        assert torch.equal(g0, torch.cat([r0["local"][step], r1["local"][step]]))
        for row in g0:
            queue[ptr] = row
            ptr = (ptr + 1) % len(queue)
    assert torch.equal(queue, r0["queue"])
    assert ckpt_io.list_checkpoints(out)  # rank 0 wrote the checkpoint


def test_shuffle_bn_round_trip(two_rank_run):
    (r0, r1), _ = two_rank_run
    for r in (r0, r1):
        assert torch.equal(r["unshuffled"], r["ids"].float())
    everything = torch.cat([r0["shuffled"], r1["shuffled"]]).sort().values
    assert torch.equal(everything, torch.cat([r0["ids"], r1["ids"]]).float().sort().values)


@pytest.mark.parametrize("sizes", [[4, 4], [5, 5, 5, 5], [3, 7, 1, 5], [6, 0, 2]])
def test_shuffle_plan_gives_each_rank_its_slice_of_the_permutation(sizes):
    """The all-to-all exchange simulated in one process: each rank receives exactly the samples of its share of
    the permuted global batch, in order (the gather path's slice when sizes are equal), and they go back."""
    from fastft.distributed import shuffle_plan

    world, n = len(sizes), sum(sizes)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    starts = [sum(sizes[:r]) for r in range(world)]
    local = [torch.arange(starts[r], starts[r] + sizes[r]) for r in range(world)]  # global sample ids
    plans = [shuffle_plan(perm, sizes, r) for r in range(world)]

    def all_to_all(chunks_of: list[torch.Tensor], send: list[list[int]]) -> list[torch.Tensor]:
        split = [list(torch.split(chunks_of[r], send[r])) for r in range(world)]
        return [torch.cat([split[src][dst] for src in range(world)]) for dst in range(world)]

    received = all_to_all([local[r][plans[r].rows] for r in range(world)], [p.send for p in plans])
    shares = []
    for r, p in enumerate(plans):
        assert len(received[r]) == sum(p.recv) == sizes[r]
        share = torch.empty_like(received[r])
        share[p.order] = received[r]
        assert torch.equal(share, perm[starts[r]:starts[r] + sizes[r]])
        shares.append(share)
    if len(set(sizes)) == 1:  # the all-gather path's slices
        assert torch.equal(torch.stack(shares), perm.view(world, -1))
    back = all_to_all([shares[r][plans[r].order] for r in range(world)], [p.recv for p in plans])
    for r, p in enumerate(plans):
        out = torch.empty_like(back[r])
        out[p.rows] = back[r]
        assert torch.equal(out, local[r])


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_shuffle_equals_the_all_gather_shuffle(tmp_path, data_cache, world):
    ov = tiny_overrides(tmp_path, data_cache, **{"optim.epochs": 1, "run.steps_per_epoch": 3,
                                                 "model.queue_size": 20})
    run(torchrun(PROBE, "shuffle", str(tmp_path), *ov, nproc=world))
    ranks = [torch.load(tmp_path / f"probe_shuffle_w{world}_rank{r}.pt", weights_only=False) for r in range(world)]
    for r in ranks:
        assert r["world"] == world
        assert torch.equal(r["keys"]["shuffle"], r["keys"]["shuffle_gather"])  # bit-identical
        assert r["keys"]["shuffle"].shape == (16, 128)
        assert torch.equal(r["unshuffled"], r["ids"].float())  # the uneven split goes back where it came from
        assert len(r["shuffled"]) == len(r["ids"])  # each rank encodes as many rows as it holds
    history = ranks[0]["losses"]
    assert len(history["shuffle"]) == 3 and history["shuffle"] == history["shuffle_gather"]
    everything = torch.cat([r["shuffled"] for r in ranks]).sort().values
    assert torch.equal(everything, torch.cat([r["ids"] for r in ranks]).float().sort().values)
    assert not all(torch.equal(r["shuffled"], r["ids"].float()) for r in ranks)  # it did shuffle


def test_ranks_see_disjoint_data_covering_the_epoch(two_rank_run):
    (r0, r1), _ = two_rank_run
    assert r0["n_batches"] == r1["n_batches"]
    a, b = set(r0["indices"]), set(r1["indices"])
    assert len(r0["indices"]) == len(r1["indices"]) == 719  # 1437 images, padded by one to split evenly
    assert a | b == set(range(1437)) and len(a & b) <= 1


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path, data_cache):
    ov = tiny_overrides(tmp_path, data_cache, **{"model.queue_size": 20})
    run(torchrun(PROBE, "equivalence", str(tmp_path), *ov))
    run([sys.executable, PROBE, "equivalence", str(tmp_path), *ov])
    one = torch.load(tmp_path / "probe_equivalence_w1_rank0.pt", weights_only=False)
    for r in (0, 1):
        two = torch.load(tmp_path / f"probe_equivalence_w2_rank{r}.pt", weights_only=False)
        torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)
        for name, g in one["grads"].items():
            # fp32 sums in another order: compare each gradient tensor as a whole (relative L2 error)
            err = ((two["grads"][name] - g).norm() / g.norm()).item()
            assert err < 1e-4, (name, err)


def test_two_nodes_rendezvous_and_train(tmp_path, data_cache):
    port = free_port()
    ov = tiny_overrides(tmp_path, data_cache, **{"optim.epochs": 1, "run.steps_per_epoch": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "fastft-test",
           "-m", "fastft.train", "configs/demo.yaml", *ov]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert ckpt_io.load(ckpt_io.list_checkpoints(tmp_path)[0])["step"] == 2
    assert "batch 16x2" in "".join(outputs)  # one global group of two ranks


def worker_pid(out_dir: Path, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` training into `out_dir` (not the launcher)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            environ = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fastft.train" in cmd and f"run.out_dir={out_dir}".encode() in cmd \
                and b"torch.distributed.run" not in cmd and f"RANK={rank}".encode() in environ:
            return int(p.name)
    return None


def test_a_restarted_attempt_never_reads_the_dead_attempts_addresses(tmp_path):
    """torchrun keeps one store for the whole job (pytorch#135712); fastft.distributed.setup keys each attempt
    apart, so the second attempt forms its group even when rank 1 is the last to join."""
    proc = subprocess.run(torchrun(PROBE, "restart", str(tmp_path), extra=("--max-restarts", "1")), cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(tmp_path / "probe_restart_w2_rank0.pt")
    assert result == {"attempt": 1, "mean_rank": 0.5}


def test_elastic_restart_after_a_worker_dies(tmp_path, data_cache):
    ov = tiny_overrides(tmp_path, data_cache, **{"optim.epochs": 3, "run.steps_per_epoch": 6})
    job = subprocess.Popen(torchrun("-m", "fastft.train", "configs/demo.yaml", *ov, extra=("--max-restarts", "1")),
                           cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and job.poll() is None:
        steps = [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
        if ckpt_io.list_checkpoints(tmp_path) and steps and 6 < max(steps) < 12:  # mid epoch 2
            pid = worker_pid(tmp_path, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = max(steps)
        time.sleep(0.05)
    output = job.communicate(timeout=300)[0]
    assert killed is not None, "never caught the job mid-epoch 2:\n" + output[-3000:]
    assert job.returncode == 0, output[-3000:]
    final = ckpt_io.load(ckpt_io.list_checkpoints(tmp_path)[0])
    assert final["step"] == 3 * 6 and final["epoch"] == 3  # as an uninterrupted run
    assert "resumed from" in output
    losses = [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert losses == list(range(1, 19))  # the history continues where the checkpoint left off, no gaps or repeats


def test_per_sample_score_rows_come_from_every_rank(two_rank_run):
    """Each rank's rows are gathered with its rank; their mean per step is the logged (rank-averaged) batch mean."""
    import numpy as np
    from fastft.score_stats import SAMPLE_SERIES, read_scores
    _, out = two_rank_run
    got = read_scores(out)
    idx = got.sample_index
    assert set(idx["rank"].tolist()) == {0, 1}
    for i, step in enumerate(got.steps):
        mine = idx["step"] == step
        per_rank = [got.samples["ft"][mine & (idx["rank"] == r)].mean(0) for r in (0, 1)]
        assert len(set(idx["sample"][mine].tolist())) * 2 == mine.sum()  # whole local batches, both ranks
        assert not np.allclose(per_rank[0], per_rank[1])  # two different batches, not one copied
        mean = np.mean(per_rank, axis=0)
        assert mean[SAMPLE_SERIES.index("pos")] == pytest.approx(got.series["ft_pos_mean"][i], rel=2e-3, abs=2e-3)
        assert mean[SAMPLE_SERIES.index("neg_var")] == pytest.approx(got.series["ft_neg_var"][i], rel=2e-3, abs=2e-3)
