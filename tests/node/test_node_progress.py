"""Progress heartbeats from a real daemon: a job waiting in line for a slot sends nothing else, and
without them its client could not tell it from a worker that took the job and went silent."""

from __future__ import annotations

import asyncio
import time

import pytest

from node.client import WorkerClient
from node.identity import Identity
from node_harness import node_toml, start_daemon

pytestmark = pytest.mark.slow

HEARTBEAT_S = 0.25


async def _first_chunk(events) -> None:
    async for event in events:
        if event.WhichOneof("event") == "chunk":
            return
    raise AssertionError("a long job ended before its first chunk")


@pytest.mark.asyncio
async def test_a_job_waiting_for_a_slot_gets_a_progress_event_each_heartbeat(tiny_model, tmp_path):
    daemon = start_daemon(tmp_path / "node", f"heartbeat_s = {HEARTBEAT_S}\n" + node_toml(tiny_model))
    clients = [await WorkerClient.connect(daemon.grpc, Identity.generate(), peer_id=daemon.peer_id)
               for _ in range(4)]
    streams = []
    behind = None
    try:
        # Both slots (node_toml's max_batch) taken by jobs of some seconds each (2000 tokens: ~5 s alone).
        for client in clients[:2]:
            streams.append(client.stream(client.sign_job(text="Count:", max_new_tokens=2000), timeout_s=120))
            await _first_chunk(streams[-1])
        waiting = clients[2].stream(clients[2].sign_job(text="Count:", max_new_tokens=4), timeout_s=120)
        streams.append(waiting)
        arrivals: list[tuple[float, str, object]] = []
        async for event in waiting:
            kind = event.WhichOneof("event")
            arrivals.append((time.monotonic(), kind, event.progress))
            if kind == "accepted":
                # Second in line for twice its idle timeout (4 heartbeats): the SDK's run takes the
                # progress events as signs of life (and skips them); without them it gives up on the worker.
                behind = asyncio.ensure_future(clients[3].run(clients[3].sign_job(text="Hi", max_new_tokens=4),
                                                              timeout_s=120, idle_timeout_s=4 * HEARTBEAT_S))
            if len([a for a in arrivals if a[1] == "progress"]) == 8:
                break
        for stream in streams:      # the slots and the place ahead free up: the job behind runs
            await stream.aclose()
        assert (await asyncio.wait_for(behind, 60)).finished
    finally:
        if behind is not None:
            behind.cancel()
        for stream in streams:
            await stream.aclose()
        for client in clients:
            await client.close()
        assert daemon.stop() == 0, daemon.stderr_text()[-3000:]
    assert [kind for _, kind, _ in arrivals] == ["accepted"] + ["progress"] * 8, arrivals
    assert all((p.queue_position, p.output_tokens) == (1, 0) for _, kind, p in arrivals[1:])
    gaps = [later[0] - earlier[0] for earlier, later in zip(arrivals, arrivals[1:])]
    # One heartbeat after the event before, each; the bounds leave a loaded 2-core box its jitter.
    assert HEARTBEAT_S * 0.9 <= sum(gaps) / len(gaps) < HEARTBEAT_S + 0.25 and max(gaps) < HEARTBEAT_S + 1.0, gaps
