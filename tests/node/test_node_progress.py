"""Progress heartbeats from a real daemon: a job waiting in line for a slot sends nothing else, and
without them its client could not tell it from a worker that took the job and went silent."""

from __future__ import annotations

import asyncio
import contextlib
import random
import string
import time

import pytest

from node.client import JobRefused, WorkerClient
from node.identity import Identity
from node_harness import CONTEXT, node_toml, start_daemon

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
            arrivals.append((time.monotonic(), kind, getattr(event, kind)))
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
    assert arrivals[0][2].queue_position == 1      # next in line when accepted, as its progress events say
    assert all((p.queue_position, p.output_tokens) == (1, 0) for _, kind, p in arrivals[1:])
    gaps = [later[0] - earlier[0] for earlier, later in zip(arrivals, arrivals[1:])]
    # One heartbeat after the event before, each; the bounds leave a loaded 2-core box its jitter.
    assert HEARTBEAT_S * 0.9 <= sum(gaps) / len(gaps) < HEARTBEAT_S + 0.25 and max(gaps) < HEARTBEAT_S + 1.0, gaps


async def _flood_tokenizer(daemon, text: str) -> None:
    """Prompts as large as admission lets through untokenized (then refused as too long), one after
    another: the tokenizer thread is never idle."""
    async with await WorkerClient.connect(daemon.grpc, Identity.generate(), peer_id=daemon.peer_id) as client:
        while True:
            with contextlib.suppress(JobRefused):
                await client.run(client.sign_job(text=text, max_new_tokens=1, ttl_s=3600), timeout_s=60)


@pytest.mark.asyncio
async def test_a_job_whose_prompt_waits_for_the_tokenizer_gets_progress_before_it_is_accepted(tiny_model, tmp_path):
    daemon = start_daemon(tmp_path / "node", "heartbeat_s = 0.05\n" + node_toml(tiny_model))
    rng = random.Random(0)
    text = "".join(rng.choice(string.ascii_lowercase + " ,.;") for _ in range(CONTEXT * 162))   # ~0.4 s each
    flood = [asyncio.create_task(_flood_tokenizer(daemon, text)) for _ in range(3)]
    seen: list[list[str]] = []
    try:
        await asyncio.sleep(1.0)
        async with await WorkerClient.connect(daemon.grpc, Identity.generate(), peer_id=daemon.peer_id) as client:
            # Each job waits for the prompt being tokenized when it comes (smallest first: not for the
            # ones queued); a few tries make sure one of them comes early in one.
            for _ in range(10):
                job = client.sign_job(text="Count:", max_new_tokens=4)
                kinds = []
                async for event in client.stream(job, timeout_s=60):
                    kinds.append(event.WhichOneof("event"))
                    if kinds[-1] == "progress" and "accepted" not in kinds:
                        assert event.progress.queue_position >= 1 and event.progress.output_tokens == 0
                seen.append(kinds)
                if kinds[0] == "progress":
                    break
    finally:
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
        assert daemon.stop() == 0, daemon.stderr_text()[-3000:]
    assert all(kinds[-1] == "result" and "accepted" in kinds for kinds in seen), seen
    assert seen[-1][0] == "progress", seen      # before it was accepted: the prompt was still waiting
