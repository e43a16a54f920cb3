"""What the dashboard shows that Prometheus does not keep: recent jobs, series, curves, refusals.

`Activity` subscribes to the EventBus and folds events into small bounded structures; the JSON API
reads snapshots of them. Events may arrive on the engine thread (EngineRound), so one lock guards
all state, and every snapshot is a copy made of plain dicts and lists.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from engine.api import DRAFT_SOURCES, DraftCounts
from node.events import (AdvertPublished, AdvertSeen, EngineRound, Event, EventBus, JobAdmitted, JobFinished,
                         JobProgress, JobRefused, NodeDraining, PeerChange)

SERIES_BUCKET_SECONDS = 10
SERIES_SPAN_SECONDS = 3600
RECENT_JOBS = 50
RECENT_PROBLEMS = 100
RECENT_ADVERTS = 20
MAX_PEERS_SHOWN = 64
MAX_POSITIONS = 32
MIN_SPEED_SPAN_SECONDS = 1.0


@dataclass
class _Bucket:
    start: float
    committed: int = 0           # tokens committed in rounds
    request_rounds: int = 0      # sum of batch sizes: one per request per round
    rounds: int = 0
    round_seconds: float = 0.0


@dataclass
class _Concurrency:
    rounds: int = 0
    requests: int = 0            # request-rounds
    drafted: int = 0             # request-rounds with a draft (the backoff skips the others)
    budget: int = 0              # draft tokens verified, summed over request-rounds
    expected: float = 0.0
    accepted: int = 0
    committed: int = 0
    round_seconds: float = 0.0


@dataclass
class _ActiveJob:
    job_id: str
    client: str
    prompt_tokens: int
    max_new_tokens: int
    admitted_at: float
    output_tokens: int = 0
    elapsed_seconds: float = 0.0
    first_token_seconds: float | None = None   # elapsed at the first progress event
    first_tokens: int = 0                       # tokens that event carried


class Activity:
    def __init__(self, events: EventBus, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.started_at = clock()
        self.draining: dict | None = None       # {"since": ..., "grace_seconds": ...} once the node stops
        self._lock = threading.Lock()
        self._series: deque[_Bucket] = deque(maxlen=SERIES_SPAN_SECONDS // SERIES_BUCKET_SECONDS)
        self._by_concurrency: dict[int, _Concurrency] = {}
        self._reached = [0] * MAX_POSITIONS
        self._accepted = [0] * MAX_POSITIONS
        self._positions = 0
        self._sources = {source: DraftCounts() for source in DRAFT_SOURCES}
        self._active: dict[str, _ActiveJob] = {}
        self._recent: deque[dict] = deque(maxlen=RECENT_JOBS)
        self._problems: deque[dict] = deque(maxlen=RECENT_PROBLEMS)
        self._refused_by_reason: Counter[str] = Counter()     # since start; the list above keeps the last ones
        self._counts = {"admitted": 0, "refused": 0, "completed": 0, "cancelled": 0, "failed": 0}
        self._peers_connected = 0
        self._adverts_published = 0
        self._recent_adverts: deque[dict] = deque(maxlen=RECENT_ADVERTS)
        self._adverts_seen = {"accepted": 0, "dropped": 0}
        self._peers_seen: dict[str, dict] = {}
        events.subscribe(self.observe)

    # ---- folding events ----

    def observe(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, JobAdmitted):
                self._counts["admitted"] += 1
                self._active[event.job_id] = _ActiveJob(event.job_id, event.client, event.prompt_tokens,
                                                        event.max_new_tokens, event.at)
            elif isinstance(event, JobProgress):
                job = self._active.get(event.job_id)
                if job is not None:
                    job.output_tokens = event.output_tokens
                    job.elapsed_seconds = event.elapsed_seconds
                    if job.first_token_seconds is None:
                        job.first_token_seconds = event.elapsed_seconds
                        job.first_tokens = event.output_tokens
            elif isinstance(event, JobFinished):
                self._finished(event)
            elif isinstance(event, JobRefused):
                self._counts["refused"] += 1
                self._refused_by_reason[event.reason] += 1
                self._problems.appendleft({"at": event.at, "kind": "refused", "reason": event.reason,
                                           "message": event.message, "client": event.client})
            elif isinstance(event, EngineRound):
                self._round(event)
            elif isinstance(event, PeerChange):
                self._peers_connected = event.connected_peers
            elif isinstance(event, AdvertPublished):
                self._adverts_published += 1
                self._recent_adverts.appendleft({"at": event.at, "sequence": event.sequence,
                                                 "free_slots": event.free_slots,
                                                 "queue_depth": event.queue_depth,
                                                 "size_bytes": event.size_bytes})
            elif isinstance(event, AdvertSeen):
                self._advert_seen(event)
            elif isinstance(event, NodeDraining):
                self.draining = {"since": event.at, "grace_seconds": event.grace_seconds}

    def _finished(self, event: JobFinished) -> None:
        job = self._active.pop(event.job_id, None)
        stats = event.stats
        self._counts[event.outcome if event.outcome in self._counts else "failed"] += 1
        self._recent.appendleft({
            "job_id": event.job_id, "client": event.client, "outcome": event.outcome,
            "admitted_at": job.admitted_at if job else None, "finished_at": event.at,
            "prompt_tokens": stats.prompt_tokens, "output_tokens": stats.output_tokens,
            "rounds": stats.rounds, "tau": round(stats.tau, 4),
            "tokens_per_second": round(stats.tokens_per_second, 3),
            "time_to_first_token": event.time_to_first_token,
            "queue_seconds": stats.queue_seconds, "amount_micros": event.amount_micros,
            "receipt_sequence": event.receipt_sequence,
        })
        for k, (reached, accepted) in enumerate(zip(stats.reached[:MAX_POSITIONS],
                                                    stats.accepted_at[:MAX_POSITIONS])):
            self._reached[k] += reached
            self._accepted[k] += accepted
            self._positions = max(self._positions, k + 1)
        for source, counts in stats.by_source.items():
            self._sources.setdefault(source, DraftCounts()).add(counts.drafted, counts.verified, counts.accepted)
        if event.outcome == "failed":
            self._problems.appendleft({"at": event.at, "kind": "failed", "reason": "job_failed",
                                       "message": f"job {event.job_id} failed after {stats.output_tokens} tokens",
                                       "client": event.client})

    def _round(self, event: EngineRound) -> None:
        report = event.report
        bucket_start = event.at - event.at % SERIES_BUCKET_SECONDS
        if not self._series or self._series[-1].start < bucket_start:
            self._series.append(_Bucket(bucket_start))
        bucket = self._series[-1]  # a late event from an older bucket is counted in the newest one
        bucket.committed += report.committed
        bucket.request_rounds += report.batch_size
        bucket.rounds += 1
        bucket.round_seconds += report.round_seconds
        row = self._by_concurrency.setdefault(report.batch_size, _Concurrency())
        row.rounds += 1
        row.requests += len(report.budgets)
        row.drafted += report.drafted
        row.budget += sum(report.budgets)
        row.expected += report.expected_accepted
        row.accepted += report.accepted
        row.committed += report.committed
        row.round_seconds += report.round_seconds

    def _advert_seen(self, event: AdvertSeen) -> None:
        self._adverts_seen["accepted" if event.accepted else "dropped"] += 1
        if event.peer_id not in self._peers_seen and len(self._peers_seen) >= MAX_PEERS_SHOWN:
            oldest = min(self._peers_seen, key=lambda p: self._peers_seen[p]["at"])
            del self._peers_seen[oldest]
        entry = self._peers_seen.setdefault(event.peer_id, {"peer_id": event.peer_id, "adverts": 0})
        entry.update(at=event.at, accepted=event.accepted, reason=event.reason, adverts=entry["adverts"] + 1)

    # ---- snapshots for the JSON API ----

    def jobs(self) -> dict:
        now = self.clock()
        with self._lock:
            active = [{
                "job_id": j.job_id, "client": j.client, "prompt_tokens": j.prompt_tokens,
                "max_new_tokens": j.max_new_tokens, "admitted_at": j.admitted_at,
                "output_tokens": j.output_tokens, "age_seconds": round(now - j.admitted_at, 3),
                "tokens_per_second": _streaming_speed(j),
                "first_token_seconds": j.first_token_seconds,     # null: in line, or prefilling
            } for j in self._active.values()]
            return {"active": active, "recent": list(self._recent), "counts": dict(self._counts)}

    def series(self) -> dict:
        now = self.clock()
        with self._lock:
            points = []
            for b in self._series:
                if b.start < now - SERIES_SPAN_SECONDS:
                    continue
                width = min(SERIES_BUCKET_SECONDS, max(now - b.start, 1e-3))
                points.append({"t": b.start, "tokens_per_second": round(b.committed / width, 3),
                               "tau": round(b.committed / b.request_rounds, 4) if b.request_rounds else None,
                               "rounds": b.rounds})
        return {"bucket_seconds": SERIES_BUCKET_SECONDS, "span_seconds": SERIES_SPAN_SECONDS, "points": points}

    def acceptance(self) -> dict:
        with self._lock:
            reached = self._reached[:self._positions]
            accepted = self._accepted[:self._positions]
        # A position no draft reached (every verify budget stopped short of it) has no acceptance to
        # show: None, not 0, which would read as drafts there always being rejected.
        positions, survive = [], 1.0
        for k, (r, a) in enumerate(zip(reached, accepted)):
            rate = a / r if r else None
            survive = survive * rate if rate is not None and survive is not None else None
            positions.append({"position": k + 1, "reached": r, "accepted": a,
                              "acceptance": None if rate is None else round(rate, 4),
                              "survival": None if survive is None else round(survive, 4)})
        return {"positions": positions}

    def draft_sources(self) -> list[dict]:
        with self._lock:
            return [{"source": source, "drafted": c.drafted, "verified": c.verified, "accepted": c.accepted,
                     "acceptance": round(c.accepted / c.verified, 4) if c.verified else None}
                    for source, c in self._sources.items()]

    def budget(self) -> dict:
        with self._lock:
            rows = sorted(self._by_concurrency.items())
            return {"rows": [{
                "batch_size": b, "rounds": c.rounds,
                "drafted_share": round(c.drafted / c.requests, 4) if c.requests else 0.0,
                "mean_budget": round(c.budget / c.requests, 3) if c.requests else 0.0,
                "mean_expected_accepted": round(c.expected / c.requests, 3) if c.requests else 0.0,
                "mean_accepted": round(c.accepted / c.requests, 3) if c.requests else 0.0,
                "tau": round(c.committed / (c.rounds * b), 4) if c.rounds and b else None,
                "mean_round_seconds": round(c.round_seconds / c.rounds, 5) if c.rounds else 0.0,
            } for b, c in rows]}

    def problems(self) -> list[dict]:
        with self._lock:
            return list(self._problems)

    def refused_by_reason(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refused_by_reason.most_common())

    def peers(self) -> dict:
        with self._lock:
            return {"connected": self._peers_connected, "adverts_published": self._adverts_published,
                    "recent_adverts": list(self._recent_adverts), "adverts_seen": dict(self._adverts_seen),
                    "peers_seen": sorted((dict(p) for p in self._peers_seen.values()),
                                         key=lambda p: -p["at"])}

    def live(self) -> dict:
        """The small summary pushed to dashboards every second."""
        now = self.clock()
        with self._lock:
            last = self._series[-1] if self._series and self._series[-1].start > now - 2 * SERIES_BUCKET_SECONDS \
                else None
            active = [{"job_id": j.job_id, "output_tokens": j.output_tokens,
                       "tokens_per_second": _streaming_speed(j)} for j in self._active.values()]
            return {"at": now, "uptime_seconds": round(now - self.started_at, 1), "active": active,
                    "counts": dict(self._counts), "peers_connected": self._peers_connected,
                    "tau": round(last.committed / last.request_rounds, 4) if last and last.request_rounds else None,
                    "tokens_per_second": sum(a["tokens_per_second"] or 0.0 for a in active)}


def _streaming_speed(job: _ActiveJob) -> float | None:
    """Tokens per second since the first progress event (the speed a client sees while it streams);
    None until a second has passed, since chunks arrive in bursts and a shorter span says nothing."""
    if job.first_token_seconds is None:
        return None
    span = job.elapsed_seconds - job.first_token_seconds
    return round((job.output_tokens - job.first_tokens) / span, 3) if span >= MIN_SPEED_SPAN_SECONDS else None
