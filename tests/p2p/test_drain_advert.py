"""A worker told to stop says so on the peer network at once: while its running jobs finish, its
adverts read `draining` with no free slot, and a client's ranking leaves it out, instead of sending
it jobs it would refuse until its last advert expired (30 s by default)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path

import pytest

from node.client import JobRefused, WorkerClient
from node.identity import Identity
from node.p2p.discovery import Discovery
from node.p2p.selection import rank

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "node"))
from node_harness import CONTEXT, node_toml, start_daemon  # noqa: E402  (the node tests' daemon harness)

pytestmark = pytest.mark.slow


def worker_advert(discovery: Discovery, peer_id: str):
    return next((a.advert for a in discovery.network.adverts() if a.peer_id == peer_id), None)


async def until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def hold(client: WorkerClient) -> None:
    """A long job, streamed until the worker ends it: it keeps the worker's drain going."""
    with contextlib.suppress(JobRefused):
        async for _ in client.stream(client.sign_job(text="Count:", max_new_tokens=CONTEXT - 8), timeout_s=120):
            pass


@pytest.mark.asyncio
async def test_a_draining_worker_advertises_so_and_clients_stop_choosing_it(tiny_llama, tmp_path):
    toml = node_toml(tiny_llama, "[admission]\ngrace_s = 60\n").replace(
        "[p2p]\nlisten = []", "[p2p]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nadvert_interval_s = 1")
    worker = start_daemon(tmp_path / "worker", toml)
    clients, jobs = [], []
    try:
        async with Discovery(Identity.generate(), [worker.ready["p2p"][0]]) as discovery:
            await until(lambda: worker_advert(discovery, worker.peer_id) is not None, 20)
            assert not worker_advert(discovery, worker.peer_id).draining
            model = worker_advert(discovery, worker.peer_id).models[0].id
            assert [c.peer_id for c in rank([worker_advert(discovery, worker.peer_id)], model)] == [worker.peer_id]
            # Two slots and two waiting: some seconds of work for the drain to wait out.
            clients = [await WorkerClient.connect(worker.grpc, Identity.generate(), peer_id=worker.peer_id)
                       for _ in range(4)]
            jobs = [asyncio.ensure_future(hold(c)) for c in clients]
            await asyncio.sleep(0.5)
            worker.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await until(lambda: worker_advert(discovery, worker.peer_id).draining, 10)
            seen_after = time.monotonic() - signalled
            advert = worker_advert(discovery, worker.peer_id)
            assert advert.free_slots == 0 and rank([advert], model) == []
            assert worker.proc.poll() is None, "the worker ended before its draining advert was seen"
        assert seen_after < 5, seen_after
        await asyncio.wait_for(asyncio.gather(*jobs), 120)
    finally:
        for job in jobs:
            job.cancel()
        for client in clients:
            await client.close()
        assert worker.stop(timeout_s=120) == 0, worker.stderr_text()[-3000:]
