"""Server-sent events for the dashboard: job, refusal and peer events as they happen, plus a tick.

Per-token progress and per-round reports are not forwarded (hundreds per second under load); the
once-a-second `tick` carries the live summary (active jobs and their speed, τ, counts) instead.
Each client has a bounded queue: a client that stops reading loses events, never the node memory.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict

from node.activity import Activity
from node.events import (AdvertPublished, AdvertSeen, Event, EventBus, JobAdmitted, JobFinished, JobRefused,
                         NodeDraining, PeerChange)

CLIENT_QUEUE = 256
MAX_CLIENTS = 32


def sse_message(event: Event) -> tuple[str, dict] | None:
    """The SSE event name and JSON body for a bus event, or None for events not forwarded."""
    if isinstance(event, JobFinished):
        stats = event.stats
        return "finished", {"job_id": event.job_id, "client": event.client, "outcome": event.outcome,
                            "output_tokens": stats.output_tokens, "tau": round(stats.tau, 4),
                            "tokens_per_second": round(stats.tokens_per_second, 3),
                            "amount_micros": event.amount_micros, "receipt_sequence": event.receipt_sequence,
                            "at": event.at}
    names = {JobAdmitted: "admitted", JobRefused: "refused", PeerChange: "peers",
             AdvertPublished: "advert_published", AdvertSeen: "advert_seen", NodeDraining: "draining"}
    name = names.get(type(event))
    return (name, asdict(event)) if name else None


def _frame(name: str, body: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


class LiveFeed:
    def __init__(self, events: EventBus, activity: Activity, tick_seconds: float = 1.0) -> None:
        self._activity = activity
        self._tick = tick_seconds
        self._clients: set[asyncio.Queue[bytes | None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        events.subscribe(self._on_event)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the loop the HTTP server runs on (events from other threads hop onto it)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def close(self) -> None:
        """End every open stream (call on the loop), so the server can stop without waiting."""
        for queue in self._clients:
            _put(queue, None)
        self._loop = None

    @property
    def full(self) -> bool:
        return len(self._clients) >= MAX_CLIENTS

    @property
    def connected(self) -> int:
        return len(self._clients)

    def _on_event(self, event: Event) -> None:
        loop = self._loop
        message = sse_message(event)
        if loop is None or message is None or not self._clients:
            return
        frame = _frame(*message)
        if threading.get_ident() == self._loop_thread:
            self._push(frame)
        else:
            loop.call_soon_threadsafe(self._push, frame)

    def _push(self, frame: bytes) -> None:
        for queue in self._clients:
            _put(queue, frame)

    async def stream(self) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_QUEUE)
        self._clients.add(queue)
        loop = asyncio.get_running_loop()
        try:
            yield b"retry: 2000\n\n" + _frame("tick", self._activity.live())
            next_tick = loop.time() + self._tick
            while True:
                try:
                    frame = await asyncio.wait_for(queue.get(), timeout=max(0.0, next_tick - loop.time()))
                except asyncio.TimeoutError:
                    next_tick = loop.time() + self._tick
                    yield _frame("tick", self._activity.live())
                    continue
                if frame is None:
                    return
                yield frame
        finally:
            self._clients.discard(queue)


def _put(queue: asyncio.Queue[bytes | None], item: bytes | None) -> None:
    try:
        queue.put_nowait(item)
    except asyncio.QueueFull:
        if item is None:  # the close sentinel must get through: make room for it
            queue.get_nowait()
            queue.put_nowait(None)
