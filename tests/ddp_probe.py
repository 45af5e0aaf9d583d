"""Run under torchrun by tests/test_distributed.py (or as one plain process for the reference side).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_probe.py MODE OUT_DIR [overrides...]

Each rank saves what it saw to OUT_DIR/probe_rank{R}.pt for the test to compare across ranks.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import fastft.moco as moco_module  # noqa: E402
from fastft import distributed as D  # noqa: E402
from fastft.config import load_config  # noqa: E402
from fastft.trainer import Trainer  # noqa: E402


def probe_train(out: Path, overrides: list[str]) -> dict:
    """Train a few steps; record every (local keys, gathered keys) pair the queue was fed."""
    trainer = Trainer(load_config(None, overrides))
    fed = []
    real_gather = moco_module.all_gather_cat

    def spy(k):
        gathered = real_gather(k)
        fed.append((k.detach().clone(), gathered.clone()))
        return gathered

    moco_module.all_gather_cat = spy
    queue0 = trainer.model.queue.clone()
    trainer.loader.set_epoch(0)
    indices = list(iter(trainer.loader.sampler))
    n_batches = len(trainer.loader)
    trainer.run()
    ids = torch.arange(3) + 100 * D.rank()  # shuffle-BN round trip on recognisable values
    shuffled, undo = D.batch_shuffle(ids.float())
    return {
        # Parameters only: BN running statistics are per rank (local batches), as in MoCo.
        "params": {k: v.detach().clone() for k, v in trainer.model.encoder_q.named_parameters()},
        "queue": trainer.model.queue.clone(), "ptr": int(trainer.model.queue_ptr), "queue0": queue0,
        "local": [a for a, _ in fed], "gathered": [b for _, b in fed], "indices": indices, "n_batches": n_batches,
        "ids": ids, "shuffled": shuffled, "unshuffled": D.batch_unshuffle(shuffled, undo),
        "world": D.world_size(),
    }


def probe_equivalence(out: Path, overrides: list[str]) -> dict:
    """First step on the same 2B inputs split across ranks; loss and encoder_q gradients."""
    trainer = Trainer(load_config(None, overrides + ["model.key_bn=sync", "ft.share_lambdas=true"]))
    g = torch.Generator().manual_seed(1234)
    x1, x2 = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    b = 8 // D.world_size()
    mine = slice(D.rank() * b, (D.rank() + 1) * b)
    loss = trainer.model(x1[mine], x2[mine], 0).loss
    loss.backward()
    return {"loss": D.all_reduce_mean(loss.detach()),
            "grads": {n: p.grad.clone() for n, p in trainer.model.encoder_q.named_parameters()}}


def probe_shuffle(out: Path, overrides: list[str]) -> dict:
    """Shuffle-BN by all-to-all against the all-gather path: the keys of one encode (same inputs, same
    permutation draw), a short run's loss history under each, and an uneven split's round trip."""
    from fastft.metrics import read_metrics

    keys, losses = {}, {}
    for key_bn in ("shuffle", "shuffle_gather"):
        run_dir = out / key_bn
        trainer = Trainer(load_config(None, overrides + [f"model.key_bn={key_bn}", f"run.out_dir={run_dir}"]))
        g = torch.Generator().manual_seed(100 + D.rank())
        x = torch.randn(16, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
        torch.manual_seed(7)  # the permutation is drawn from rank 0's torch RNG
        keys[key_bn] = trainer.model.encode_keys(x)
        trainer.run()
        D.barrier()
        losses[key_bn] = [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    ids = torch.arange(3 + D.rank()) + 100 * D.rank()  # ranks hold 3, 4, 5, ... rows: an uneven split
    shuffled, plan = D.shuffle_a2a(ids.float()[:, None])
    return {"keys": keys, "losses": losses, "ids": ids, "shuffled": shuffled[:, 0],
            "unshuffled": D.unshuffle_a2a(shuffled, plan)[:, 0], "world": D.world_size()}


def probe_restart(out: Path, overrides: list[str]) -> dict:
    """Join the group, then (first attempt only) rank 1 dies. In the second attempt rank 1 joins late, so
    rank 0 reads rank 1's address before rank 1 has written the new one: the stale-address race, made certain."""
    import os
    import time

    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if attempt == 1 and os.environ["RANK"] == "1":
        time.sleep(3)
    D.setup(torch.device("cpu"), timeout_s=60)
    total = D.all_reduce_mean(torch.tensor(float(D.rank())))
    if attempt == 0 and D.rank() == 1:
        os._exit(1)
    return {"attempt": attempt, "mean_rank": float(total)}


if __name__ == "__main__":
    mode, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    result = {"train": probe_train, "equivalence": probe_equivalence, "shuffle": probe_shuffle, "restart": probe_restart}[mode](out, overrides)
    torch.save(result, out / f"probe_{mode}_w{D.world_size()}_rank{D.rank()}.pt")
    D.cleanup()
