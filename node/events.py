"""In-process events the node publishes for metrics, the dashboard and logs.

The service and the p2p layer publish; observers (metrics, dashboard feed) subscribe. Publishing is
synchronous fan-out, so subscribers must be cheap and never block.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Union

from engine.api import RequestStats, RoundReport

log = logging.getLogger(__name__)


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class JobAdmitted:
    job_id: str               # hex
    client: str               # hex of the client's public key
    prompt_tokens: int
    max_new_tokens: int
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class JobRefused:
    reason: str               # short tag: "bad_signature", "replayed", "quota", ...
    message: str
    client: str = ""
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    output_tokens: int
    elapsed_seconds: float    # since admission
    first_token: bool = False
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class JobFinished:
    job_id: str
    client: str
    outcome: str              # "completed" | "cancelled" | "failed"
    stats: RequestStats
    amount_micros: int
    receipt_sequence: int
    time_to_first_token: float | None
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class EngineRound:
    report: RoundReport
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class PeerChange:
    connected_peers: int
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class AdvertPublished:
    sequence: int
    free_slots: int
    queue_depth: int
    size_bytes: int
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class AdvertSeen:
    peer_id: str
    accepted: bool            # false when the validator dropped it
    reason: str = ""
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class NodeDraining:
    """The node is stopping: it admits no new job, and its running jobs have `grace_seconds` to end."""
    grace_seconds: float
    at: float = field(default_factory=_now)


Event = Union[JobAdmitted, JobRefused, JobProgress, JobFinished, EngineRound, PeerChange,
              AdvertPublished, AdvertSeen, NodeDraining]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Callable[[Event], None]] = []

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        self._subscribers.append(callback)

    def publish(self, event: Event) -> None:
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:  # an observer's bug must not fail a job
                log.exception("event subscriber %r failed on %s", callback, type(event).__name__)
