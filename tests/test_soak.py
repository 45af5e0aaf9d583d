"""The kill -9 soak (scripts/soak.py), short: 3 SIGKILLs (one inside a checkpoint write), each attempt restarted
with the same command, end bit-identical to the uninterrupted run, with no temp file left and metrics.jsonl
equal record for record. README, "Reliability", has the 20-kill run."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_three_kills_leave_no_trace(tmp_path, data_cache):
    proc = subprocess.run([sys.executable, "scripts/soak.py", "--kills", "3", "--seed", "1", "--out", str(tmp_path),
                           "--cache-dir", data_cache, "--", "optim.epochs=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "3 kills (1 inside a write), 3 successful resumes, 0 failed resumes, 0 temp files left" in out, out
    assert " 0 differ" in out and "soak: PASS" in out
    assert "in the write of checkpoints/.epoch_" in out  # the kill inside a checkpoint write happened
    assert not list((tmp_path / "killed").rglob("*.tmp-*"))
