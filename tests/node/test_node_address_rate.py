"""The limit on Submit calls per source address, in a real daemon listening on both IPv4 and IPv6
loopback: jobs signed by new keys each are refused past it, and another address is not."""

from __future__ import annotations

import time

import grpc
import pytest

from node.admission import Reason
from node.client import JobRefused, WorkerClient
from node.identity import Identity
from node.service import TARPIT_S
from node_harness import node_toml, start_daemon

pytestmark = pytest.mark.slow

LIMIT = 3


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    # Every address of the host, plaintext (TLS is on by default off loopback): the test dials it
    # as 127.0.0.1 and as ::1, two sources.
    toml = node_toml(tiny_model, f"[admission]\naddress_rate_per_minute = {LIMIT}\n[tls]\nmode = \"off\"\n")
    node = start_daemon(tmp_path_factory.mktemp("address-rate"),
                        toml.replace('grpc_listen = "127.0.0.1:0"', 'grpc_listen = "[::]:0"'))
    yield node
    assert node.stop() == 0, node.stderr_text()[-3000:]


async def submit(daemon, host: str) -> str:
    """One job from a new key through `host`; its outcome or the refusal's reason."""
    port = daemon.grpc.rpartition(":")[2]
    async with await WorkerClient.connect(f"{host}:{port}", Identity.generate(), peer_id=daemon.peer_id) as client:
        try:
            result = await client.run(client.sign_job(text="Count:", max_new_tokens=4), timeout_s=60)
        except JobRefused as refusal:
            assert refusal.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            return f"{refusal.reason}: {refusal.details}"
    return "served" if result.finished else result.finish_reason


@pytest.mark.asyncio
async def test_new_keys_from_one_address_meet_its_limit_and_another_address_does_not(daemon):
    ipv4 = [await submit(daemon, "127.0.0.1") for _ in range(LIMIT + 1)]
    assert ipv4[:LIMIT] == ["served"] * LIMIT, ipv4
    assert ipv4[LIMIT].startswith(f"{Reason.RATE_LIMITED}: "), ipv4
    assert f"127.0.0.1 sent {LIMIT} jobs in the last minute (limit {LIMIT} per address)" in ipv4[LIMIT]
    # The refused call was not counted: the address stays at its limit, no further behind. Its
    # answer is held back, so a flooder waiting for answers cannot send faster for being refused.
    started = time.monotonic()
    assert (await submit(daemon, "127.0.0.1")).startswith(f"{Reason.RATE_LIMITED}: 127.0.0.1 sent {LIMIT} jobs")
    assert time.monotonic() - started >= TARPIT_S
    assert await submit(daemon, "[::1]") == "served"
