"""The limits per source address, in real daemons listening on both IPv4 and IPv6 loopback: on Submit
calls a minute, and on jobs held at once. Jobs signed by new keys each are refused past them, and
another address is not."""

from __future__ import annotations

import time

import grpc
import pytest

from dspark.v1 import job_pb2
from node.admission import Reason
from node.client import JobRefused, WorkerClient
from node.identity import Identity
from node.service import TARPIT_S
from node_harness import CONTEXT, node_toml, start_daemon

pytestmark = pytest.mark.slow

LIMIT = 3


def dual_stack_daemon(tiny_model, data_dir, admission: str):
    # Every address of the host, plaintext (TLS is on by default off loopback): the tests dial it
    # as 127.0.0.1 and as ::1, two sources.
    toml = node_toml(tiny_model, f"[admission]\n{admission}\n[tls]\nmode = \"off\"\n")
    return start_daemon(data_dir, toml.replace('grpc_listen = "127.0.0.1:0"', 'grpc_listen = "[::]:0"'))


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    node = dual_stack_daemon(tiny_model, tmp_path_factory.mktemp("address-rate"), f"address_rate_per_minute = {LIMIT}")
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


@pytest.mark.asyncio
async def test_an_address_holds_at_most_its_limit_of_jobs_whatever_keys_sign_them(tiny_model, tmp_path):
    node = dual_stack_daemon(tiny_model, tmp_path, "address_rate_per_minute = 0\nmax_concurrent_per_address = 1")
    try:
        port = node.grpc.rpartition(":")[2]
        async with await WorkerClient.connect(f"127.0.0.1:{port}", Identity.generate(), peer_id=node.peer_id) as hog:
            job = hog.sign_job(text="Count:", max_new_tokens=CONTEXT - 8)
            events = hog.stream(job, timeout_s=120)
            assert (await anext(events)).WhichOneof("event") in ("accepted", "progress")
            started = time.monotonic()
            refused = await submit(node, "127.0.0.1")
            assert refused == (f"{Reason.TOO_MANY_CONCURRENT}: 127.0.0.1 already has 1 job(s) running or waiting "
                               "(limit 1 per address)"), refused
            assert time.monotonic() - started >= TARPIT_S
            assert await submit(node, "[::1]") == "served"
            # Refused while the job was held (the decision is made as the call arrives; the answer
            # comes after the tarpit). Once the job ends, the address is free again.
            await hog.cancel(job_pb2.JobRequest.FromString(job.payload).job_id)
            assert [e.result.finish_reason async for e in events if e.HasField("result")] in (["cancelled"], ["length"])
        assert await submit(node, "127.0.0.1") == "served"
    finally:
        assert node.stop() == 0, node.stderr_text()[-3000:]
