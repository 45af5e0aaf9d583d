"""Kill -9 soak: does a run that is killed outright, again and again, and restarted with the same command end
exactly where an uninterrupted run ends, with no trace of the kills?

    python scripts/soak.py --kills 20                      # one process, SIGKILL at 20 moments
    python scripts/soak.py --kills 3 --torchrun            # 2 torchrun workers, one killed 3 times (--max-restarts)
    python scripts/soak.py --kills 5 -- optim.epochs=8     # extra key=value overrides for both runs

A short CPU training (configs/demo.yaml made tiny: ResNet-18 small stem at 8x8, 12 epochs of 3 steps, a checkpoint
every epoch, score logging on) runs once uninterrupted. Then the same run, in another folder, is killed with
SIGKILL: every other kill lands inside a checkpoint write (the moment a temp file of the attempt appears), the
others at a random moment (drawn so that the kills spread over the whole run). Alone, each killed attempt is restarted with the same
command; under --torchrun the job runs with --max-restarts KILLS and torchrun restarts the workers after each
kill of one of them (a random rank; rank 0, the writer, for the checkpoint-write kills). After the last kill it
runs to the end. Then, between the two runs:

- the final checkpoints, leaf by leaf (parameters, queue, BN statistics, optimizer and scaler state, loss
  history, every rank's random streams): bit-identical, torch.equal;
- metrics.jsonl, record for record (images_per_s and epoch_seconds, timings, left out);
- the score chunks (scores/*.npz), array by array;
- temp files of killed writers left anywhere in the run folder (none may be);
- failed resumes: attempts that ended with an error instead of being killed or finishing.

It prints the verdict and exits 0 when everything holds, 1 otherwise. tests/test_soak.py runs 3 kills.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastft import checkpoint as ckpt_io
from fastft.metrics import read_metrics
from fastft.pipelines.stale import writer_pid

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data.path": "builtin:digits", "data.image_size": 8, "loader.batch_size": 16, "loader.workers": 0,
        "model.arch": "resnet18", "model.small_stem": True, "model.queue_size": 40, "model.momentum": 0.9, "optim.epochs": 12,
        "optim.lr": 0.06, "run.steps_per_epoch": 3, "run.device": "cpu", "run.progress": False,
        "run.tensorboard": False, "knn.every": 0, "run.log_every": 1, "run.ckpt_every": 1, "run.keep_ckpts": 2}
TIMING = {"images_per_s", "epoch_seconds"}  # metrics keys that measure time, not training


def overrides(out: Path, cache: str, extra: list[str]) -> list[str]:
    return [f"{k}={v}" for k, v in {**TINY, "data.cache_dir": cache, "run.out_dir": str(out)}.items()] + extra


def command(out: Path, cache: str, extra: list[str], nproc: int = 0, restarts: int = 0) -> list[str]:
    train = ["-m", "fastft.train", "configs/demo.yaml", *overrides(out, cache, extra)]
    if not nproc:
        return [sys.executable, *train]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--max-restarts", str(restarts), *train]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
    return out


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if writer_pid(p.name) is not None] if out.is_dir() else []


def epochs_done(out: Path) -> int:
    paths = ckpt_io.list_checkpoints(out)
    return int(paths[0].stem.split("_")[1]) if paths else 0


@dataclass
class Timing:
    startup: float  # launch to the first step's record
    per_epoch: float

    def window(self, epochs_left: int, kills_left: int) -> float:
        """The span a random kill is drawn from: the kills left share the epochs left, so they land all along the
        run (not all in its last epoch), and an attempt never has the time to finish while kills are left."""
        random_kills = max(1, (kills_left + 1) // 2)
        share = max(1.5, 2 * epochs_left / random_kills)  # about an epoch of progress per kill, on average
        return self.startup + self.per_epoch * min(epochs_left - 0.3, share)


def straight(out: Path, cache: str, extra: list[str], nproc: int) -> Timing:
    """The uninterrupted run, timed."""
    t0 = time.perf_counter()
    proc = start(command(out, cache, extra, nproc), out.with_suffix(".log"))
    first = None
    while proc.poll() is None:
        if first is None and (out / "metrics.jsonl").is_file():
            first = time.perf_counter() - t0
        time.sleep(0.05)
    if proc.returncode != 0:
        sys.exit(f"soak: the uninterrupted run failed (exit {proc.returncode}); see {out.with_suffix('.log')}")
    total = time.perf_counter() - t0
    epochs = int(dict(a.split("=", 1) for a in overrides(out, cache, extra))["optim.epochs"])
    first = first or total / 2
    return Timing(first, max(0.1, (total - first) / epochs))


@dataclass
class Soak:
    kills: list[str] = field(default_factory=list)  # how each kill landed
    failed: list[int] = field(default_factory=list)  # exit statuses of attempts that failed on their own


def wait_and_kill(pick, proc: subprocess.Popen, delay: float | None, out: Path) -> str | None:
    """Kill the process `pick()` names when a checkpoint temp file of it appears (delay None) or after `delay`
    seconds; None when the job ended first."""
    t0 = time.perf_counter()
    while proc.poll() is None:
        pid = pick()
        if pid is not None:
            if delay is None:
                temps = [p for p in temp_files(out / "checkpoints") if writer_pid(p.name) == pid]
                if temps:
                    os.kill(pid, signal.SIGKILL)
                    return f"in the write of {temps[0].relative_to(out)}"
            elif time.perf_counter() - t0 >= delay:
                os.kill(pid, signal.SIGKILL)
                return f"at {delay:.2f} s"
        time.sleep(0.001 if delay is None else 0.01)
    return None


def soak_alone(out: Path, cache: str, extra: list[str], kills: int, timing: Timing, rng: random.Random,
               epochs: int) -> Soak:
    """Kill, restart with the same command, until `kills` kills are done; then run to the end."""
    result = Soak()
    cmd = command(out, cache, extra)
    while True:
        proc = start(cmd, out.with_suffix(".log"))
        if len(result.kills) < kills:
            in_write = len(result.kills) % 2 == 1
            delay = None if in_write else rng.uniform(0.0, timing.window(epochs - epochs_done(out),
                                                                         kills - len(result.kills)))
            how = wait_and_kill(lambda: proc.pid, proc, delay, out)
            proc.wait()
            if how is not None:
                result.kills.append(how)
                print(f"soak: kill {len(result.kills)}/{kills} {how} (resumable from epoch {epochs_done(out)})",
                      flush=True)
                continue
        if proc.wait() != 0:
            result.failed.append(proc.returncode)
            if len(result.failed) > 3:
                return result
            continue
        if len(result.kills) >= kills:
            return result
        print(f"soak: the run finished before kill {len(result.kills) + 1}", flush=True)
        return result


def soak_torchrun(out: Path, cache: str, extra: list[str], kills: int, timing: Timing, rng: random.Random,
                  epochs: int) -> Soak:
    """One torchrun job with --max-restarts `kills`; one worker killed `kills` times."""
    result = Soak()
    proc = start(command(out, cache, extra, nproc=2, restarts=kills), out.with_suffix(".log"))

    def worker(rank_: int):
        def pick():
            for pid in children(proc.pid):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank_}".encode() in environ:
                    return pid
            return None
        return pick

    while len(result.kills) < kills and proc.poll() is None:
        in_write = len(result.kills) % 2 == 1
        rank_ = 0 if in_write else rng.randrange(2)
        delay = rng.uniform(0.0, timing.window(epochs - epochs_done(out), kills - len(result.kills)))
        how = wait_and_kill(worker(rank_), proc, None if in_write else delay, out)
        if how is None:
            break
        result.kills.append(f"rank {rank_} {how}")
        print(f"soak: kill {len(result.kills)}/{kills}: rank {rank_} {how}", flush=True)
        while proc.poll() is None and len(children(proc.pid)) < 2:  # torchrun restarts the workers
            time.sleep(0.05)
    if proc.wait() != 0:
        result.failed.append(proc.returncode)
    return result


def flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in flatten(val, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): obj}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def compare(a: Path, b: Path) -> tuple[int, list[str]]:
    """(leaves compared, differences) between two finished runs."""
    ca, cb = (ckpt_io.load(ckpt_io.list_checkpoints(d)[0]) for d in (a, b))
    for c in (ca, cb):
        del c["config"]["run"]["out_dir"]
    fa, fb = flatten(ca), flatten(cb)
    diffs = [f"checkpoint {k}" for k in sorted(set(fa) | set(fb)) if k not in fa or k not in fb or not same(fa[k], fb[k])]
    n = len(fa)
    ma, mb = ([{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(d)] for d in (a, b))
    n += len(ma)
    if ma != mb:
        diffs.append(f"metrics.jsonl: {len(ma)} vs {len(mb)} records, first difference at record "
                     f"{next((i for i, (x, y) in enumerate(zip(ma, mb)) if x != y), min(len(ma), len(mb)))}")
    chunks = lambda d: sorted(p.name for p in (d / "scores").glob("*.npz"))
    if chunks(a) != chunks(b):
        diffs.append(f"score chunks: {chunks(a)} vs {chunks(b)}")
    for name in chunks(a) if chunks(a) == chunks(b) else []:
        with np.load(a / "scores" / name) as za, np.load(b / "scores" / name) as zb:
            for key in za.files:
                n += 1
                if key not in zb.files or not same(za[key], zb[key]):
                    diffs.append(f"scores/{name}:{key}")
    return n, diffs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--torchrun", action="store_true", help="2 torchrun workers; one killed, torchrun restarts")
    ap.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    ap.add_argument("--out", default="runs/soak", help="folder of the two runs (emptied first)")
    ap.add_argument("--cache-dir", default="~/.cache/fastft", help="data.cache_dir (the built-in digits)")
    ap.add_argument("extra", nargs="*", help="key=value overrides for both runs (after --)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    epochs = int(dict(a.split("=", 1) for a in overrides(out, args.cache_dir, args.extra))["optim.epochs"])
    nproc = 2 if args.torchrun else 0
    t0 = time.perf_counter()
    timing = straight(out / "straight", args.cache_dir, args.extra, nproc)
    print(f"soak: uninterrupted run done ({timing.startup:.1f} s to the first step, {timing.per_epoch:.2f} s per "
          f"epoch)", flush=True)
    soak = (soak_torchrun if args.torchrun else soak_alone)(out / "killed", args.cache_dir, args.extra, args.kills,
                                                            timing, random.Random(args.seed), epochs)
    finished = bool(ckpt_io.list_checkpoints(out / "killed")) and epochs_done(out / "killed") == epochs
    n, diffs = compare(out / "straight", out / "killed") if finished else (0, ["the killed run did not finish"])
    left = temp_files(out / "killed")
    ok = len(soak.kills) == args.kills and not soak.failed and not diffs and not left
    print(f"soak: {len(soak.kills)} kills ({sum('write' in k for k in soak.kills)} inside a write), "
          f"{len(soak.kills) - len(soak.failed)} successful resumes, {len(soak.failed)} failed resumes, "
          f"{len(left)} temp files left, {n} values compared, {len(diffs)} differ "
          f"({time.perf_counter() - t0:.0f} s)")
    for line in diffs[:10] + [f"left: {p}" for p in left[:10]]:
        print(f"  {line}")
    print(f"soak: {'PASS' if ok else 'FAIL'}: {'bit-identical to' if not diffs else 'differs from'} the "
          f"uninterrupted run" + ("" if args.torchrun else f"; logs in {out}/*.log"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
