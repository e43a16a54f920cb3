"""Counts of recent events per key over a sliding minute: the memory behind the node's rate limits
(jobs per client key, Submit calls per source network)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable

WINDOW_S = 60.0


class RecentCounts:
    """Event times of the last `WINDOW_S` seconds, per key. Keys with no event in the window are
    forgotten as new events come: a client may sign every job with a new key, or call from a new
    address, and a week of them must not stay in memory."""

    def __init__(self) -> None:
        # The key that was counted least recently first.
        self._times: OrderedDict[Hashable, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are held (those with an event in the last window, and some older ones not
        yet forgotten)."""
        return len(self._times)

    def count(self, key: Hashable, now: float) -> int:
        recent = self._times.get(key)
        cutoff = now - WINDOW_S
        while recent and recent[0] < cutoff:
            recent.popleft()
        return len(recent or ())

    def add(self, key: Hashable, now: float) -> None:
        self._times.setdefault(key, deque()).append(now)
        self._times.move_to_end(key)
        cutoff = now - WINDOW_S
        while self._times:
            recent = next(iter(self._times.values()))
            if recent and recent[-1] >= cutoff:
                return
            self._times.popitem(last=False)
