"""The async engine's watchdog (engine/async_engine.py `_watch_for_stall`): a round that never ends
fails the requests waiting on it and ends `wait()`, so the node stops and is restarted; slow rounds
and idle time do not. The hang is the one stand-in here: a model forward that blocks until the test
releases it, as a kernel on a hung GPU never returns."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from engine.api import GenerationRequest, RequestRejected, SamplingParams, TokenChunk
from engine.async_engine import AsyncEngine, EngineStalled
from engine.build import build_engine
from engine.config import EngineConfig
from node.lifecycle import Supervisor


def engine_with_forward_hook(tiny_llama, stall_timeout_s: float, before_forward) -> AsyncEngine:
    engine = AsyncEngine(build_engine(EngineConfig(model=str(tiny_llama), method="ar", max_batch=1)),
                         stall_timeout_s)
    forward = engine.engine.model.forward

    def hooked(*args, **kwargs):
        before_forward()
        return forward(*args, **kwargs)
    engine.engine.model.forward = hooked
    return engine


async def run_to_end(engine: AsyncEngine, request_id: str, n: int, first_chunk: asyncio.Event | None = None):
    """The request's chunks until it ends, and how it ended: 'done' or the error."""
    chunks = 0
    try:
        async for event in engine.generate(GenerationRequest(request_id, (1, 2, 3), SamplingParams(max_new_tokens=n))):
            if isinstance(event, TokenChunk):
                chunks += 1
                if first_chunk is not None:
                    first_chunk.set()
    except (RuntimeError, RequestRejected) as exc:
        return chunks, exc
    return chunks, "done"


@pytest.mark.asyncio
async def test_a_round_that_never_ends_fails_its_requests_and_ends_wait(tiny_llama):
    hang, release = threading.Event(), threading.Event()

    def maybe_hang():
        if hang.is_set():
            release.wait()
    engine = engine_with_forward_hook(tiny_llama, 0.5, maybe_hang)
    await engine.start()
    try:
        first_chunk = asyncio.Event()
        running = asyncio.create_task(run_to_end(engine, "running", 500, first_chunk))
        await asyncio.wait_for(first_chunk.wait(), 30)
        waiting = asyncio.create_task(run_to_end(engine, "waiting", 4))    # max_batch 1: it waits for the slot
        hang.set()
        hung_at = time.monotonic()
        (chunks, running_end), (_, waiting_end) = await asyncio.wait_for(asyncio.gather(running, waiting), 10)
        assert chunks >= 1 and isinstance(running_end, RuntimeError) and "engine stalled" in str(running_end)
        assert isinstance(waiting_end, RuntimeError) and "engine stalled" in str(waiting_end)
        with pytest.raises(EngineStalled, match=r"engine.stall_timeout_s = 0.5"):
            await asyncio.wait_for(engine.wait(), 5)
        assert time.monotonic() - hung_at < 5
        _, late = await run_to_end(engine, "late", 4)
        assert isinstance(late, RequestRejected) and late.reason == "stopping"
        stopping = time.monotonic()
        await asyncio.wait_for(engine.stop(), 5)
        assert time.monotonic() - stopping < 1 and engine._thread.is_alive()   # not joined: it is stuck
    finally:
        release.set()
        hang.clear()
        engine._thread.join(10)
    assert not engine._thread.is_alive()     # once the kernel returns, the thread sees the stop and ends


@pytest.mark.asyncio
async def test_slow_rounds_and_idle_time_are_not_a_stall(tiny_llama):
    engine = engine_with_forward_hook(tiny_llama, 0.3, lambda: time.sleep(0.1))
    await engine.start()
    try:
        waited = asyncio.create_task(engine.wait())
        assert (await run_to_end(engine, "slow", 8))[1] == "done"     # 9 rounds of 0.1 s: longer than 0.3 s
        await asyncio.sleep(1.0)                                        # idle, three limits long
        assert (await run_to_end(engine, "again", 2))[1] == "done"
        assert not waited.done()
    finally:
        await engine.stop()
    await asyncio.wait_for(waited, 5)


@pytest.mark.asyncio
async def test_a_stalled_engine_stops_the_node_in_time_and_says_why(tiny_llama):
    """The daemon's supervisor (node/lifecycle.py) over the real engine: the stall is reported as the
    engine's death and the stop does not wait for the stuck thread."""
    release = threading.Event()
    engine = engine_with_forward_hook(tiny_llama, 0.5, lambda: release.wait())
    supervisor = Supervisor([engine], stop_timeout_s=30)
    try:
        task = asyncio.create_task(supervisor.run())
        _, end = await asyncio.wait_for(run_to_end(engine, "stuck", 4), 10)
        assert isinstance(end, RuntimeError) and "engine stalled" in str(end)
        report = await asyncio.wait_for(task, 5)
        [(name, what)] = report.failed
        assert name == "engine" and what.startswith("died: engine stalled: a round has run")
    finally:
        release.set()
