"""kill -9 the real daemon while clients' jobs run and receipts are being written, restart it:
every receipt a client got is in the ledger, nothing is half-written, the jobs cut off get 'failed'
receipts the clients can fetch, and `receipts verify` passes."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from dspark.v1.job_pb2 import JobRequest
from node.client import ClientError, JobRefused, WorkerClient
from node.identity import Identity
from node.ledger import LEDGER_FILE, Ledger
from node.ledger_audit import audit_ledger

# The node tests' daemon harness (a real `dspark-node run` child on free loopback ports).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "node"))
from node_harness import node_toml, start_daemon  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


async def keep_submitting(daemon, identity: Identity, received: dict, in_flight: dict) -> None:
    """Submit jobs back to back until the daemon dies under us; `in_flight` keeps the signed jobs not
    yet answered, whose receipts the client fetches after the restart."""
    async with await WorkerClient.connect(daemon.grpc, identity, peer_id=daemon.peer_id) as client:
        while True:
            job = client.sign_job(text="Count from one to a hundred:", max_new_tokens=48)
            key = (identity.public_key, JobRequest.FromString(job.payload).job_id)
            in_flight[key] = job
            try:
                result = await client.run(job, timeout_s=60)
            except (JobRefused, ClientError):
                return
            del in_flight[key]
            received[key] = result.receipt_envelope


def running_jobs(data_dir) -> set[tuple[bytes, bytes]]:
    conn = sqlite3.connect((data_dir / LEDGER_FILE).as_uri() + "?mode=ro", uri=True)
    rows = conn.execute("SELECT client_key, job_id FROM jobs WHERE status = 'running'").fetchall()
    conn.close()
    return set(rows)


@pytest.mark.asyncio
async def test_kill_9_daemon_mid_jobs_then_restart(tiny_model, tmp_path, cli):
    data_dir = tmp_path / "node"
    toml = node_toml(tiny_model, "[pricing]\nper_mtok_micros = 250000\n")
    clients = [Identity.generate() for _ in range(3)]
    received: dict[tuple[bytes, bytes], object] = {}
    in_flight: dict[tuple[bytes, bytes], object] = {}

    daemon = start_daemon(data_dir, toml)
    try:
        tasks = [asyncio.create_task(keep_submitting(daemon, c, received, in_flight)) for c in clients]
        deadline = time.monotonic() + 120
        while len(received) < 9 and time.monotonic() < deadline and not any(t.done() for t in tasks):
            await asyncio.sleep(0.02)
        assert len(received) >= 9, "jobs did not complete before the kill"
        daemon.stop(signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        daemon.stop(signal.SIGKILL)
    assert daemon.proc.returncode == -signal.SIGKILL

    reader = Ledger.open_readonly(data_dir / LEDGER_FILE)
    report = audit_ledger(reader)
    assert report.ok, [str(p) for p in report.problems]
    for (client_key, job_id), envelope in received.items():
        assert reader.receipt(client_key, job_id) == envelope
    reader.close()
    cut_off = running_jobs(data_dir)
    assert cut_off, "no job was running at the kill"
    assert cut_off <= in_flight.keys()

    daemon = start_daemon(data_dir, toml)
    try:
        assert daemon.ready["recovered"] == len(cut_off)
        assert not running_jobs(data_dir)
        by_key = {c.public_key: c for c in clients}
        for client_key, job_id in cut_off:
            async with await WorkerClient.connect(daemon.grpc, by_key[client_key], peer_id=daemon.peer_id) as client:
                receipt = await client.get_receipt(in_flight[(client_key, job_id)])
            assert (receipt.outcome, receipt.output_tokens, receipt.amount_micros) == ("failed", 0, 0)
    finally:
        assert daemon.stop() == 0, daemon.stderr_text()[-3000:]

    code, out, err = cli("verify", "--data-dir", str(data_dir))
    assert code == 0, err
    assert out.startswith(f"ok: {report.checked + len(cut_off)} receipts")
