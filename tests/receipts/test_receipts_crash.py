"""Crash safety with a real process: kill -9 a writer mid-stream, reopen, and nothing is lost or
half-written (every committed receipt is there, every finished job has its receipt, verify passes)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

from receipts_helpers import CLIENT, WORKER, job_id

from node.ledger import LEDGER_FILE, Ledger
from node.ledger_audit import audit_ledger

WRITER = Path(__file__).with_name("ledger_writer.py")


def run_and_kill(path: Path, first: int, receipts_before_kill: int) -> list[int]:
    """Start the writer, let it commit some receipts, SIGKILL it; returns the jobs it reported."""
    child = subprocess.Popen([sys.executable, str(WRITER), str(path), str(first)], stdout=subprocess.PIPE,
                             text=True)
    reported = []
    try:
        while len(reported) < receipts_before_kill:
            line = child.stdout.readline()
            assert line, f"writer exited early with {child.wait()}"
            reported.append(int(line))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    return reported


def test_kill_9_mid_stream_loses_nothing_and_leaves_nothing_half_written(tmp_path):
    path = tmp_path / LEDGER_FILE
    rng = random.Random(7)
    reported: list[int] = []
    for round_ in range(4):
        reported += run_and_kill(path, first=round_ * 100_000, receipts_before_kill=rng.randint(20, 80))

        reader = Ledger.open_readonly(path)
        report = audit_ledger(reader)   # includes: no job marked finished without its receipt
        assert report.ok, [str(p) for p in report.problems]
        missing = [n for n in reported if reader.receipt(CLIENT.public_key, job_id(n)) is None]
        assert not missing, f"receipts reported committed but lost: {missing[:5]}"
        reader.close()

    ledger = Ledger.open(path, WORKER)
    recovered = ledger.recover()   # the jobs admitted ahead when the last kill came
    assert recovered >= 2
    assert ledger._conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'running'").fetchone()[0] == 0
    count = ledger.totals().receipts
    ledger.close()
    # Earlier rounds' running jobs were recovered by the next writer at its start.
    assert count >= len(reported) + recovered
    # The real entry point, as an operator runs it after a crash.
    verify = subprocess.run([sys.executable, "-m", "node.cli", "receipts", "verify", "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.startswith(f"ok: {count} receipts")
