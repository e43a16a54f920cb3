"""Full daemons (tiny model) on the peer network: a client submits with no --node, discovery picks
the cheapest worker; when that worker is killed mid-job the job finishes on the next one, under a
new job id, and the dead worker bills nothing for its partial output."""

from __future__ import annotations

import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dspark.v1.receipt_pb2 import Receipt
from node.client import JobRefused, WorkerClient
from node.identity import Identity
from node.ledger import Ledger
from node.p2p.failover import submit_via_network

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "node"))
from node_harness import start_daemon  # noqa: E402  (the node tests' daemon harness, reused)

pytestmark = pytest.mark.slow
PRICES = (1_000, 5_000)


def worker_toml(model: Path, bootstrap: str, price: int) -> str:
    return f"""
grpc_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
[p2p]
listen = ["/ip4/127.0.0.1/tcp/0"]
bootstrap = ["{bootstrap}"]
advert_interval_s = 1
advert_ttl_s = 5
[engine]
model = "{model}"
max_batch = 2
max_context = 2048
threads = 1
[pricing]
per_mtok_micros = {price}
"""


@pytest.fixture(scope="module")
def swarm(peer_factory, tmp_path_factory):
    from engine.testing import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    bootstrap = peer_factory()          # a p2p-only peer every worker and the client join through
    with ThreadPoolExecutor(len(PRICES)) as pool:
        daemons = list(pool.map(lambda price: start_daemon(tmp_path_factory.mktemp(f"worker{price}"),
                                                           worker_toml(model, bootstrap.addr, price)), PRICES))
    yield bootstrap, daemons
    for daemon in daemons:
        daemon.stop(signal.SIGKILL)


def test_ready_line_gives_the_addresses_other_nodes_bootstrap_from(swarm):
    _, daemons = swarm
    for daemon in daemons:    # the log line saying so is at INFO, below the default level
        addrs = daemon.ready["p2p"]
        assert addrs and all(a.startswith("/ip4/127.0.0.1/tcp/") and a.endswith(f"/p2p/{daemon.peer_id}")
                             for a in addrs)


@pytest.mark.asyncio
async def test_submit_without_node_runs_on_the_cheapest_worker(swarm):
    bootstrap, (cheap, dear) = swarm
    outcome = await submit_via_network(Identity.generate(), [bootstrap.addr], cheap.ready["model"],
                                       {"text": "Hello"}, max_new_tokens=8)
    assert outcome.worker == cheap.peer_id
    assert outcome.result.receipt.worker_peer_id == cheap.peer_id
    assert outcome.result.receipt.output_tokens == len(outcome.result.output_ids) > 0
    assert {c.peer_id for c in outcome.candidates} == {cheap.peer_id, dear.peer_id}
    print(f"\nsubmit -> first token {outcome.time_to_first_token_s:.3f} s including discovery "
          f"({outcome.discovery_s:.3f} s joining and finding workers)")


@pytest.mark.asyncio
async def test_job_survives_the_death_of_its_worker(swarm):
    bootstrap, (cheap, dear) = swarm
    client = Identity.generate()
    killed: list[bool] = []

    def kill_on_first_text(_text: str) -> None:
        if not killed:
            killed.append(True)
            cheap.proc.send_signal(signal.SIGKILL)   # the chosen worker dies mid-stream

    outcome = await submit_via_network(client, [bootstrap.addr], cheap.ready["model"], {"text": "Once upon"},
                                       max_new_tokens=400, on_text=kill_on_first_text)
    first, last = outcome.attempts[0], outcome.attempts[-1]
    assert killed and first.peer_id == cheap.peer_id and first.outcome == "died" and first.chunks_received >= 1
    assert outcome.worker == dear.peer_id and last.outcome == "completed"
    receipt = outcome.result.receipt
    assert receipt.worker_peer_id == dear.peer_id and receipt.job_id == outcome.result.job_id != first.job_id
    assert receipt.output_tokens == len(outcome.result.output_ids)

    # The surviving worker never saw the first job id: nothing billed twice there.
    async with await WorkerClient.connect(dear.grpc, client, peer_id=dear.peer_id) as survivor:
        with pytest.raises(JobRefused):
            await survivor.get_receipt(survivor.sign_job(text="Once upon", job_id=first.job_id))
    # The dead worker's ledger, recovered as its next start would: the job is 'failed', 0 billed.
    cheap.proc.wait(timeout=10)
    ledger = Ledger.open(cheap.data_dir / "ledger.sqlite3", Identity.load(cheap.data_dir / "node.key"))
    try:
        assert ledger.recover() == 1
        abandoned = Receipt.FromString(ledger.receipt(client.public_key, first.job_id).payload)
        assert (abandoned.outcome, abandoned.output_tokens, abandoned.amount_micros) == ("failed", 0, 0)
    finally:
        ledger.close()
