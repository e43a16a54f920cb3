"""The keepalive policy both ends read (node/keepalive.py), on real gRPC calls over loopback with the
intervals shortened: a job whose worker's path dies fails the client's call within seconds, a call
that waits without data survives the pings, a path that dies while the client waits is noticed by
the client, and one that dies mid-answer by the server."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from node import keepalive
from node.client import JobRefused, WorkerClient
from node.identity import Identity
from node_harness import FreezingRelay, node_toml, start_daemon


@pytest.fixture(autouse=True)
def short_keepalive(monkeypatch):
    monkeypatch.setattr(keepalive, "KEEPALIVE_MS", 500)
    monkeypatch.setattr(keepalive, "PING_TIMEOUT_MS", 1000)


@pytest.mark.asyncio
async def test_a_path_that_goes_dead_mid_job_fails_the_call_within_seconds(tiny_model, tmp_path):
    """A real worker. No FIN, no RST, no bytes: without keepalive the client waited for the job's
    deadline (600 s by default) before it could fail over."""
    daemon = start_daemon(tmp_path / "node", node_toml(tiny_model))
    try:
        relay = FreezingRelay(daemon.grpc)
        async with relay as endpoint, await WorkerClient.connect(endpoint, Identity.generate(),
                                                                 peer_id=daemon.peer_id) as client:
            frozen_at = None
            with pytest.raises(JobRefused) as info:
                async for event in client.stream(client.sign_job(text="Count:", max_new_tokens=2000),
                                                 timeout_s=60):
                    if event.WhichOneof("event") == "chunk" and frozen_at is None:
                        relay.frozen.set()
                        frozen_at = time.monotonic()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value
            assert time.monotonic() - frozen_at < 15
    finally:
        assert daemon.stop() == 0, daemon.stderr_text()[-3000:]


async def serve(messages: int, every_s: float, first_after_s: float = 0.0,
                ended: asyncio.Event | None = None) -> tuple[grpc.aio.Server, str]:
    async def answer(request, context):
        try:
            await asyncio.sleep(first_after_s)
            for _ in range(messages):
                yield b"token"
                await asyncio.sleep(every_s)
        finally:
            if ended is not None:
                ended.set()
    server = grpc.aio.server(options=keepalive.server_options())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "t.Worker", {"Submit": grpc.unary_stream_rpc_method_handler(answer)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.asyncio
async def test_a_call_waiting_without_data_is_not_ended_for_its_pings():
    """Like a job waiting in line: the server sends nothing for a while. grpc's default ping policy
    ended the call with GOAWAY "Too many pings" after two strikes."""
    server, endpoint = await serve(messages=1, every_s=0, first_after_s=5.0)
    try:
        async with grpc.aio.insecure_channel(endpoint, options=keepalive.channel_options()) as channel:
            got = [m async for m in channel.unary_stream("/t.Worker/Submit")(b"", timeout=30)]
        assert got == [b"token"]
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_a_path_that_dies_while_the_call_waits_without_data_ends_it():
    """Like a job in line when the worker's machine vanishes. The client sends nothing after its
    request, and grpc's default stops its pings after two without data of its own, so a path that
    died later was waited on until the deadline."""
    server, endpoint = await serve(messages=1, every_s=0, first_after_s=20.0)
    relay = FreezingRelay(endpoint)
    try:
        async with relay as through, grpc.aio.insecure_channel(through, options=keepalive.channel_options()) as ch:
            call = ch.unary_stream("/t.Worker/Submit")(b"", timeout=15)
            await asyncio.sleep(3.0)        # several pings in
            relay.frozen.set()
            frozen_at = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                async for _ in call:
                    pass
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
        assert time.monotonic() - frozen_at < 8
    finally:
        await server.stop(None)


@pytest.mark.asyncio
async def test_a_client_whose_path_dies_mid_answer_ends_the_servers_call():
    """On a worker, the call's end cancels the job and frees its slot; without the server's own pings
    the job of a vanished client ran on to its last token."""
    ended = asyncio.Event()
    server, endpoint = await serve(messages=400, every_s=0.05, ended=ended)
    relay = FreezingRelay(endpoint)
    try:
        async with relay as through, grpc.aio.insecure_channel(through, options=keepalive.channel_options()) as ch:
            call = ch.unary_stream("/t.Worker/Submit")(b"", timeout=60)
            received = 0
            async for _ in call:
                received += 1
                if received == 10:
                    break
            relay.frozen.set()      # the client is still there, its path is not
            await asyncio.wait_for(ended.wait(), 8)     # the answer had 15 s to run
    finally:
        await server.stop(None)
