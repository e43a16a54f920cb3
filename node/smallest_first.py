"""A gate that lets at most N holders through at once, the smallest waiting one first: the order in
which prompts get a tokenizer thread (node/service.py)."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator


class SmallestFirst:
    """Tokenizing costs about a prompt's bytes. In arrival order, a chat turn of a few hundred bytes
    waited behind every prompt of 331 KB queued before it (0.4 s each on one core), so clients
    flooding a node with large prompts delayed everyone's jobs. Smallest first, a small prompt
    waits at most for the ones being tokenized; a large one waits while smaller ones keep coming,
    which the per-client and per-address rates bound. Ties go in arrival order."""

    def __init__(self, slots: int):
        self._free = slots
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, size: int) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (size, next(self._arrival), granted))
            try:
                await granted
            except asyncio.CancelledError:
                # Left waiting: its entry stays, and _pass_on skips it. Granted the slot and then
                # cancelled before it ran: the slot goes to the next one.
                if granted.done() and not granted.cancelled():
                    self._pass_on()
                raise
        try:
            yield
        finally:
            self._pass_on()

    def _pass_on(self) -> None:
        while self._waiting:
            granted = heapq.heappop(self._waiting)[2]
            if not granted.done():
                granted.set_result(None)
                return
        self._free += 1
