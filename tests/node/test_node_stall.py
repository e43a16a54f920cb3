"""A real node whose engine watchdog trips (engine.stall_timeout_s, engine/async_engine.py): the job
in flight ends 'failed' with a signed receipt for what was streamed, the node stops on its own with
exit 1 and says why, and its ledger verifies. The limit is set below a real round's time (1 ms), so
a healthy round stands in for a hung GPU's; tests/engine/test_async_engine_stall.py hangs one."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys

import pytest

from node.client import WorkerClient
from node.identity import Identity
from node.ledger_schema import LEDGER_FILE
from node_harness import ROOT, node_toml, start_daemon


@pytest.mark.asyncio
async def test_a_stalled_engine_fails_its_job_with_a_receipt_and_stops_the_node(tiny_model, tmp_path):
    daemon = start_daemon(tmp_path / "node", node_toml(tiny_model, "stall_timeout_s = 0.001"))
    try:
        async with await WorkerClient.connect(daemon.grpc, Identity.generate(), peer_id=daemon.peer_id) as client:
            result = await client.run(client.sign_job(text="Count: 1 2 3", max_new_tokens=2000), timeout_s=60)
        assert result.finish_reason == "error" and result.receipt.outcome == "failed"
        assert daemon.proc.wait(timeout=60) == 1
    finally:
        daemon.stop()
    log = daemon.stderr_text()
    assert "engine stalled: a round has run" in log and "engine.stall_timeout_s = 0.001" in log
    assert "dspark-node: engine: died: engine stalled" in log and "Traceback" not in log
    with contextlib.closing(sqlite3.connect(daemon.data_dir / LEDGER_FILE)) as conn:
        assert conn.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0] == 0
        assert [row[0] for row in conn.execute("SELECT outcome FROM receipts")] == ["failed"]
    verify = subprocess.run([sys.executable, "-m", "node.cli", "receipts", "verify", "--data-dir",
                             str(daemon.data_dir)], cwd=ROOT, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
