"""Workers a long-lived client (the gateway) saw fail lately, tried after the others for a while.

Without it each request starts again from the cheapest adverts: a few cheap workers that refuse
every job, or have died with their adverts still live, cost every request its attempts (three
refusers ended every job of the default three attempts), although the client just watched them fail.
A demoted worker is still tried when the others are not enough; it only loses its place in line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from node.admission import REQUEST_FAULTS
from node.p2p.failover import Attempt

DEMOTION_S = 60.0       # about two advert lifetimes: a worker back on its feet re-earns its place soon


class RecentFailures:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._failed_at: dict[str, float] = {}

    def record(self, attempts: Iterable[Attempt]) -> None:
        now = self._clock()
        for attempt in attempts:
            if attempt.outcome == "completed":
                self._failed_at.pop(attempt.peer_id, None)
            elif attempt.reason not in REQUEST_FAULTS:
                self._failed_at[attempt.peer_id] = now

    def demoted(self) -> frozenset[str]:
        cutoff = self._clock() - DEMOTION_S
        # Forgotten once expired, so throwaway peer IDs cannot grow the table for long.
        self._failed_at = {peer: at for peer, at in self._failed_at.items() if at > cutoff}
        return frozenset(self._failed_at)
