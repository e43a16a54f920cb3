"""Full daemons (tiny model) on the peer network: a client submits with no --node, discovery picks
the cheapest worker; a GPU-second price cap below that worker's time price sends the job to the
other one, and below both workers' prices names each price and cap; caps above a worker's prices sign
its advertised prices, so it cannot bill up to the caps; when the chosen worker is killed mid-job the
job finishes on the next one, under a new job id, and the dead worker bills nothing for its partial
output; `submit` acknowledges the receipt on this path too."""

from __future__ import annotations

import base64
import json
import signal
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dspark.v1.job_pb2 import JobRequest
from dspark.v1.receipt_pb2 import Receipt
from node.cli import main as cli_main
from node.client import ClientError, JobRefused, WorkerClient
from node.envelope import seal
from node.identity import Identity
from node.ledger import Ledger
from node.p2p.failover import submit_via_network
from node.receipts import billed_amount

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "node"))
from node_harness import start_daemon  # noqa: E402  (the node tests' daemon harness, reused)

pytestmark = pytest.mark.slow
# (per million tokens, per GPU-second): the cheap worker also prices its time, the dear one does not.
# The worker that prices time is the cheaper one at any speed of a token a second or more.
PRICES = ((1_000, 1), (5_000_000, 0))
TIME_PRICE = PRICES[0][1]


def worker_toml(model: Path, bootstrap: str, price: int, time_price: int = 0) -> str:
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
per_gpu_second_micros = {time_price}
"""


@pytest.fixture(scope="module")
def swarm(peer_factory, tmp_path_factory):
    from engine.testing import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    bootstrap = peer_factory()          # a p2p-only peer every worker and the client join through
    with ThreadPoolExecutor(len(PRICES)) as pool:
        daemons = list(pool.map(lambda prices: start_daemon(tmp_path_factory.mktemp(f"worker{prices[0]}"),
                                                            worker_toml(model, bootstrap.addr, *prices)), PRICES))
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


def submit(swarm, key: Path, *flags: str, capsys) -> tuple[int, str]:
    """`dspark-node submit` through the peer network (no --node) as `key`'s client: exit code, stderr."""
    bootstrap, (cheap, _) = swarm
    capsys.readouterr()
    code = cli_main(["submit", "--model", cheap.ready["model"], "--bootstrap", bootstrap.addr, "--key", str(key),
                     "--prompt", "Hello", "--max-new-tokens", "4", *flags])
    return code, capsys.readouterr().err


def ledger_rows(daemon, client: Path) -> tuple[list[Receipt], int]:
    """The receipts `client`'s key holds in the worker's ledger, and its rows in the jobs table."""
    key = Identity.load(client).public_key
    ledger = Ledger.open_readonly(daemon.data_dir / "ledger.sqlite3")
    try:
        receipts = [row.receipt() for row in ledger.latest(100, client_key=key)]
    finally:
        ledger.close()
    conn = sqlite3.connect(f"file:{daemon.data_dir / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        jobs = conn.execute("SELECT COUNT(*) FROM jobs WHERE client_key = ?", (key,)).fetchone()[0]
    finally:
        conn.close()
    return receipts, jobs


@pytest.mark.parametrize("cap", [TIME_PRICE, 3 * TIME_PRICE])
def test_a_gpu_second_cap_at_or_above_the_time_price_runs_on_the_worker_that_prices_time(swarm, tmp_path,
                                                                                       capsys, cap):
    _, (timed, _) = swarm
    code, err = submit(swarm, tmp_path / "client.key", "--max-price-gpu-second", str(cap), capsys=capsys)
    assert code == 0 and f"verified (worker {timed.peer_id})" in err, err
    (receipt,), jobs = ledger_rows(timed, tmp_path / "client.key")
    assert jobs == 1 and receipt.price_per_gpu_second_micros == TIME_PRICE <= cap and receipt.gpu_seconds > 0
    assert receipt.amount_micros == billed_amount(receipt.output_tokens, PRICES[0][0], receipt.gpu_seconds,
                                                  TIME_PRICE)
    assert f"amount {receipt.amount_micros} micros" in err


def test_selection_skips_a_worker_whose_time_price_is_above_the_cap(swarm, tmp_path, capsys):
    _, (timed, untimed) = swarm       # the timed worker is cheaper per token: chosen first without the cap
    code, err = submit(swarm, tmp_path / "client.key", "--max-price-gpu-second", str(TIME_PRICE - 1), capsys=capsys)
    assert code == 0 and f"verified (worker {untimed.peer_id})" in err, err
    assert ledger_rows(timed, tmp_path / "client.key") == ([], 0)
    (receipt,), _ = ledger_rows(untimed, tmp_path / "client.key")
    assert receipt.price_per_gpu_second_micros == 0


def test_caps_below_every_workers_price_are_refused_naming_each_price_and_cap(swarm, tmp_path, capsys):
    _, (timed, untimed) = swarm
    code, err = submit(swarm, tmp_path / "client.key", "--max-price-gpu-second", str(TIME_PRICE - 1),
                       "--max-price", str(PRICES[1][0] - 1), capsys=capsys)
    assert code == 1, err
    assert f"{timed.peer_id} charges {TIME_PRICE} micros per GPU-second, above the cap of {TIME_PRICE - 1}" in err
    assert f"{untimed.peer_id} charges {PRICES[1][0]} micros per million tokens, above the cap of " \
           f"{PRICES[1][0] - 1}" in err
    assert ledger_rows(timed, tmp_path / "client.key") == ledger_rows(untimed, tmp_path / "client.key") == ([], 0)


def test_the_worker_that_prices_time_refuses_a_lower_cap_and_writes_nothing(swarm, tmp_path, capsys):
    _, (timed, _) = swarm
    capsys.readouterr()
    code = cli_main(["submit", "--node", timed.grpc, "--key", str(tmp_path / "client.key"), "--prompt", "Hello",
                     "--max-new-tokens", "4", "--max-price-gpu-second", str(TIME_PRICE - 1)])
    err = capsys.readouterr().err
    assert code == 1 and "price_too_low" in err, err
    assert f"GPU-second price cap {TIME_PRICE - 1} is below this node's price of {TIME_PRICE}" in err
    assert ledger_rows(timed, tmp_path / "client.key") == ([], 0)


def test_submit_on_the_network_acknowledges_the_receipt_and_writes_it_out(swarm, tmp_path, capsys):
    """As with --node (tests/node/test_node_daemon.py): the worker's ledger holds the client's
    countersignature, and --receipt-out the receipt and that acknowledgment."""
    _, (timed, _) = swarm       # the cheaper per token: chosen without caps
    key, out = tmp_path / "client.key", tmp_path / "receipt.json"
    code, err = submit(swarm, key, "--receipt-out", str(out), capsys=capsys)
    assert code == 0, err
    ledger = Ledger.open_readonly(timed.data_dir / "ledger.sqlite3")
    try:
        (row,) = ledger.latest(100, client_key=Identity.load(key).public_key)
    finally:
        ledger.close()
    record = json.loads(out.read_text())
    assert row.ack_bytes is not None and base64.b64decode(record["acknowledgment"]) == row.ack_bytes
    assert (record["receipt_digest"], record["worker_peer_id"]) == (row.digest.hex(), timed.peer_id)
    assert f"receipt #{row.sequence} acknowledged (countersigned with the client key {key})" in err


@pytest.mark.asyncio
async def test_caps_above_the_advertised_prices_sign_the_advertised_prices(swarm):
    _, (timed, _) = swarm
    async with await WorkerClient.connect(timed.grpc, Identity.generate(), peer_id=timed.peer_id) as client:
        job = client.sign_job(text="Hello", max_new_tokens=4, max_price_per_mtok_micros=50 * PRICES[0][0],
                              max_price_per_gpu_second_micros=50 * TIME_PRICE)
        request = JobRequest.FromString(job.payload)
        assert (request.max_price_per_mtok_micros, request.max_price_per_gpu_second_micros) == PRICES[0]
        result = await client.run(job)
    assert (result.receipt.price_per_mtok_micros, result.receipt.price_per_gpu_second_micros) == PRICES[0]
    # The same worker billing this job one micro above its advert (its own key, amount by the rule):
    # within the client's caps, but not within what the job agreed to.
    worker = Identity.load(timed.data_dir / "node.key")
    for price, advertised in zip(("price_per_mtok_micros", "price_per_gpu_second_micros"), PRICES[0]):
        dearer = Receipt()
        dearer.CopyFrom(result.receipt)
        setattr(dearer, price, advertised + 1)
        dearer.amount_micros = billed_amount(dearer.output_tokens, dearer.price_per_mtok_micros, dearer.gpu_seconds,
                                             dearer.price_per_gpu_second_micros)
        with pytest.raises(ClientError, match=f"receipt refused: .* above the job's cap of {advertised}$"):
            client._check_receipt(seal(worker, dearer), job, result.output_ids)


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
