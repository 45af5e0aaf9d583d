"""What score logging costs on a training step: `python scripts/bench_scores.py [CONFIG] [key=value ...]`.

Times full training steps (MoCo forward with FT, backward, SGD step) on real batches from the config's loader,
held in memory so data loading is not in the step (the overhead is a share of compute alone: conservative),
in interleaved rounds with score logging off, on (features used in the loss) and on with the untransformed
features too (the default), and reports the median step time of each. Because the cores may be shared, it also
times the logging call alone (ScoreRecorder.observe + commit on the step's own logits) and a flush, which are
less noisy, and states them as a share of the median step.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

from fastft.config import load_config
from fastft.device import pick_device
from fastft.loss import select_loss
from fastft.moco import MoCo
from fastft.pipelines.loader import pretrain_loader
from fastft.score_stats import ScoreRecorder, ScoreStore


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="configs/demo.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (off, on, on+untransformed)")
    ap.add_argument("--batches", type=int, default=4, help="real batches kept in memory and cycled")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, args.overrides)
    device = pick_device(cfg.run.device)
    torch.manual_seed(0)
    model = MoCo(cfg.model, cfg.ft, select_loss(cfg.loss.kernel, device)).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    batches = [(v1, v2) for v1, v2, _ in itertools.islice(pretrain_loader(cfg, device), args.batches)]
    out = tempfile.mkdtemp(prefix="fastft-bench-scores-")
    recorders = {}
    for name, raw in (("on", False), ("on+untransformed", True)):
        rec = ScoreRecorder(replace(cfg.scores, untransformed=raw), cfg.model.temperature, device,
                            ScoreStore(f"{out}/{name}"))
        rec.begin(0, cfg.model.queue_size)
        recorders[name] = rec
    step_no = itertools.count(1)

    def block(rec: ScoreRecorder | None) -> float:
        sync(device)
        t0 = time.perf_counter()
        for i in range(args.steps):
            v1, v2 = batches[i % len(batches)]
            loss, _, _ = model(v1, v2, 0, scores=rec)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rec is not None:
                rec.commit(next(step_no), 0)
        sync(device)
        return (time.perf_counter() - t0) / args.steps

    block(None)  # warm-up
    times: dict[str, list[float]] = {"off": [], "on": [], "on+untransformed": []}
    for _ in range(args.rounds):
        times["off"].append(block(None))
        for name, rec in recorders.items():
            times[name].append(block(rec))
    median = {k: statistics.median(v) for k, v in times.items()}

    # The logging call alone, on this config's logits, and a flush of a full chunk.
    v1, v2 = batches[0]
    with torch.no_grad():
        q = torch.nn.functional.normalize(model.encoder_q(v1), dim=1).float()
        k = torch.nn.functional.normalize(model.encoder_k(v2), dim=1).float()
    draw = model.ft.draw(q.shape[0], model.queue, 0)
    q_hat, k_hat = model.ft.positives(q, k, draw)
    logits = model.loss_fn(q_hat, k_hat, model.queue.clone(), cfg.model.temperature, draw.lam_n, draw.perm)[1]
    iso = {}
    for name, rec in recorders.items():
        rec.flush()
        reps = min(50, cfg.scores.flush_every - 1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            rec.observe(logits, q_hat, k_hat, q=q, k=k, queue=model.queue, draw=draw)
            rec.commit(next(step_no), 0)
        sync(device)
        observe_s = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        rec.flush()
        iso[name] = (observe_s, time.perf_counter() - t0)

    n, kq = batches[0][0].shape[0], cfg.model.queue_size
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; {cfg.model.arch} "
          f"{cfg.data.image_size}px, batch {n}, K {kq}, FT pos={cfg.ft.pos} neg={cfg.ft.neg}, "
          f"{args.rounds} rounds x {args.steps} steps (data loading excluded)")
    print(f"{'logging':<18} {'median step ms':>15} {'vs off':>8} {'observe ms':>11} {'share':>7} {'flush ms':>9} "
          f"{'per step':>9}")
    print(f"{'off':<18} {1e3 * median['off']:>15.1f}")
    for name in recorders:
        obs, fl = iso[name]
        per_step = fl / cfg.scores.flush_every
        print(f"{name:<18} {1e3 * median[name]:>15.1f} {100 * (median[name] / median['off'] - 1):>7.2f}% "
              f"{1e3 * obs:>11.3f} {100 * (obs + per_step) / median['off']:>6.2f}% {1e3 * fl:>9.2f} "
              f"{1e3 * per_step:>8.4f}")
    print("share = (observe + flush / scores.flush_every) / median step without logging")
    return 0


if __name__ == "__main__":
    sys.exit(main())
