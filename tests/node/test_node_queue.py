"""The node's waiting line, in a real daemon: a burst of jobs is admitted up to its slots plus its
queue and refused past it, never accepted and then failed by the engine."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from node.client import JobRefused, WorkerClient
from node.identity import Identity
from node.receipts import verify_receipt
from node_harness import node_toml, start_daemon

pytestmark = pytest.mark.slow

# Two slots (node_toml's max_batch) and one place in line, in the engine and in admission.
QUEUE = "max_queue = 1\n[admission]\nmax_queue = 1\n"


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    node = start_daemon(tmp_path_factory.mktemp("queue"), node_toml(tiny_model, QUEUE))
    yield node
    assert node.stop() == 0, node.stderr_text()[-3000:]


async def _outcome(daemon, client: WorkerClient) -> str:
    try:
        result = await client.run(client.sign_job(text="Count:", max_new_tokens=48), timeout_s=120)
    except JobRefused as refusal:
        assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
        return refusal.reason
    return verify_receipt(result.receipt_envelope, daemon.peer_id, result.output_ids).outcome


@pytest.mark.asyncio
async def test_a_burst_fills_the_slots_and_the_line_and_the_rest_is_refused(daemon):
    # Different clients, so no per-client quota applies; all four Submits reach the node at once,
    # before any of them is tokenized or handed to the engine.
    clients = [await WorkerClient.connect(daemon.grpc, Identity.generate(), peer_id=daemon.peer_id)
               for _ in range(4)]
    try:
        outcomes = await asyncio.gather(*(_outcome(daemon, c) for c in clients))
    finally:
        for client in clients:
            await client.close()
    assert sorted(outcomes) == ["completed", "completed", "completed", "queue_full"], outcomes
