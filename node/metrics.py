"""Prometheus metrics of the node (`/metrics`, prefix `dspark_`), fed only by EventBus events.

Besides events, a few gauges read live engine state (queue depth, free slots, active requests, the
lookup corpus's fill) at scrape time; those are plain attribute reads, never a blocking call. The
registry is our own, so tests and several nodes in one process never share counters.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.api import DRAFT_SOURCES, CorpusFill, EngineInfo
from node.events import (AdvertPublished, AdvertSeen, EngineRound, Event, EventBus, JobAdmitted, JobFinished,
                         JobRefused, PeerChange)

OUTCOMES = ("completed", "cancelled", "failed")
# Label values come from other parts (refusal tags) and from the engine (draft positions): cap how
# many distinct values a label may take, so a bug upstream cannot blow up the series count.
MAX_REASONS = 32
MAX_POSITIONS = 32

ROUND_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TAU_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0)
BUDGET_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
NO_CORPUS = CorpusFill(tokens=0, documents=0, capacity=0)


class EngineView(Protocol):
    """The read-only part of `AsyncEngine` that metrics and the dashboard look at."""
    info: EngineInfo
    free_slots: int
    queue_depth: int
    active: int
    corpus_fill: CorpusFill | None    # None: no cross-request lookup


def _corpus(engine: EngineView) -> CorpusFill:
    return engine.corpus_fill or NO_CORPUS


class NodeMetrics:
    def __init__(self, events: EventBus, engine: EngineView, peer_id: str) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self._lock = threading.Lock()  # guards the label-cap sets; events may come from the engine thread
        self._reasons: set[str] = set()

        info = engine.info
        Gauge("dspark_node_info", "Constant 1, labelled with what this node serves", [
            "peer_id", "model", "method", "drafter", "device", "dtype"], registry=reg).labels(
            peer_id, info.model_id, info.method, info.drafter_id, info.device, info.dtype).set(1)
        Gauge("dspark_node_start_time_seconds", "Unix time the node started",
              registry=reg).set(time.time())

        # Jobs.
        self.jobs_admitted = Counter("dspark_jobs_admitted", "Jobs admitted to the engine", registry=reg)
        self.jobs_refused = Counter("dspark_jobs_refused", "Jobs refused, by reason", ["reason"], registry=reg)
        self.jobs_finished = Counter("dspark_jobs_finished", "Jobs finished, by outcome", ["outcome"], registry=reg)
        for outcome in OUTCOMES:
            self.jobs_finished.labels(outcome)
        self.prompt_tokens = Counter("dspark_prompt_tokens", "Prompt tokens of finished jobs (tokens in)",
                                     registry=reg)
        self.output_tokens = Counter("dspark_output_tokens", "Output tokens of finished jobs (tokens out)",
                                     registry=reg)
        self.ttft = Histogram("dspark_time_to_first_token_seconds", "Admission to first output token",
                              buckets=TTFT_BUCKETS, registry=reg)
        self.job_speed = Histogram("dspark_job_output_tokens_per_second",
                                   "Output tokens per second of busy time, per finished job",
                                   buckets=SPEED_BUCKETS, registry=reg)

        # Speculation, per finished job. tau over a window is about (accepted + rounds) / rounds: a round an
        # accepted EOS ended adds no bonus token, which the per-job histogram counts (RequestStats.tau).
        self.request_rounds = Counter("dspark_request_rounds", "Speculative rounds summed over finished jobs",
                                      registry=reg)
        # By source (engine.api.DRAFT_SOURCES), so that an operator sees what the lookup corpus earns.
        self.drafted = Counter("dspark_drafted_tokens", "Draft tokens proposed, by source", ["source"],
                               registry=reg)
        self.verified = Counter("dspark_verified_draft_tokens", "Draft tokens sent to the target to verify, by source",
                                ["source"], registry=reg)
        self.accepted = Counter("dspark_accepted_draft_tokens", "Draft tokens the target accepted, by source",
                                ["source"], registry=reg)
        for counter in (self.drafted, self.verified, self.accepted):
            for source in DRAFT_SOURCES:
                counter.labels(source)
        self.tau = Histogram("dspark_request_tau", "Tokens committed per round, per job",
                             buckets=TAU_BUCKETS, registry=reg)
        self.position_reached = Counter(
            "dspark_draft_position_reached", "Times draft position k was verified with 1..k-1 accepted",
            ["position"], registry=reg)
        self.position_accepted = Counter(
            "dspark_draft_position_accepted", "Times draft position k was accepted (see _reached)",
            ["position"], registry=reg)

        # Engine rounds.
        self.batch_size = Histogram("dspark_round_batch_size", "Requests verified together per round",
                                    buckets=BATCH_BUCKETS, registry=reg)
        self.budget = Histogram("dspark_round_verify_budget_tokens",
                                "Draft tokens verified per request per round (the scheduler's budget)",
                                buckets=BUDGET_BUCKETS, registry=reg)
        self.round_seconds = Histogram("dspark_round_duration_seconds", "Wall time of one speculative round",
                                       buckets=ROUND_SECONDS_BUCKETS, registry=reg)
        self.phase_seconds = Counter("dspark_round_phase_seconds", "Round time by phase", ["phase"],
                                     registry=reg)
        self.round_expected = Counter("dspark_round_expected_accepted_tokens",
                                      "Accepted draft tokens the scheduler expected", registry=reg)
        self.round_accepted = Counter("dspark_round_accepted_tokens", "Draft tokens accepted in rounds",
                                      registry=reg)
        self.round_committed = Counter("dspark_round_committed_tokens", "Tokens committed in rounds",
                                       registry=reg)
        self.round_requests = Counter("dspark_round_requests", "Requests verified in rounds, by whether "
                                      "they got a draft (the backoff skips those whose drafts do not pay)",
                                      ["drafted"], registry=reg)
        Gauge("dspark_engine_queue_depth", "Requests waiting for a batch slot",
              registry=reg).set_function(lambda: engine.queue_depth)
        Gauge("dspark_engine_free_slots", "Batch slots free now", registry=reg).set_function(lambda: engine.free_slots)
        Gauge("dspark_engine_active_requests", "Requests being decoded now",
              registry=reg).set_function(lambda: engine.active)
        Gauge("dspark_lookup_corpus_tokens", "Tokens of requests' text the cross-request lookup holds now",
              registry=reg).set_function(lambda: _corpus(engine).tokens)
        Gauge("dspark_lookup_corpus_documents", "Requests whose text the cross-request lookup holds now",
              registry=reg).set_function(lambda: _corpus(engine).documents)
        Gauge("dspark_lookup_corpus_capacity_tokens", "Tokens of finished requests' text the cross-request "
              "lookup keeps (0: off)", registry=reg).set_function(lambda: _corpus(engine).capacity)

        # Billing (receipts signed by this process).
        self.receipts = Counter("dspark_receipts", "Receipts signed", registry=reg)
        self.billed = Counter("dspark_billed_micros", "Amount billed on receipts, in micro-units", registry=reg)

        # Peer network.
        self.peers = Gauge("dspark_p2p_peers_connected", "libp2p peers connected", registry=reg)
        self.adverts_published = Counter("dspark_p2p_adverts_published", "Capacity adverts published",
                                         registry=reg)
        self.adverts_seen = Counter("dspark_p2p_adverts_seen", "Capacity adverts received from peers",
                                    ["result"], registry=reg)
        for result in ("accepted", "dropped"):
            self.adverts_seen.labels(result)

        events.subscribe(self.observe)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type.

        Our names are all legacy-safe, so we announce format 0.0.4, which every Prometheus parses
        (the library's default, 1.0.0, is unknown to Prometheus 2.x such as Debian's 2.42).
        """
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    def observe(self, event: Event) -> None:
        if isinstance(event, JobAdmitted):
            self.jobs_admitted.inc()
        elif isinstance(event, JobRefused):
            self.jobs_refused.labels(self._reason_label(event.reason)).inc()
        elif isinstance(event, JobFinished):
            self._finished(event)
        elif isinstance(event, EngineRound):
            self._round(event)
        elif isinstance(event, PeerChange):
            self.peers.set(event.connected_peers)
        elif isinstance(event, AdvertPublished):
            self.adverts_published.inc()
        elif isinstance(event, AdvertSeen):
            self.adverts_seen.labels("accepted" if event.accepted else "dropped").inc()
        # JobProgress (one per streamed chunk) feeds the dashboard's live speeds, not a metric.

    def _reason_label(self, reason: str) -> str:
        with self._lock:
            if reason in self._reasons:
                return reason
            if len(self._reasons) < MAX_REASONS and reason.replace("_", "").isalnum() and len(reason) <= 40:
                self._reasons.add(reason)
                return reason
        return "other"

    def _finished(self, event: JobFinished) -> None:
        stats = event.stats
        self.jobs_finished.labels(event.outcome if event.outcome in OUTCOMES else "failed").inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.output_tokens.inc(stats.output_tokens)
        if event.time_to_first_token is not None:
            self.ttft.observe(event.time_to_first_token)
        if stats.output_tokens:
            self.job_speed.observe(stats.tokens_per_second)
        self.request_rounds.inc(stats.rounds)
        for source, counts in stats.by_source.items():
            self.drafted.labels(source).inc(counts.drafted)
            self.verified.labels(source).inc(counts.verified)
            self.accepted.labels(source).inc(counts.accepted)
        if stats.rounds:
            self.tau.observe(stats.tau)
        for k, (reached, accepted) in enumerate(zip(stats.reached[:MAX_POSITIONS],
                                                    stats.accepted_at[:MAX_POSITIONS])):
            self.position_reached.labels(str(k + 1)).inc(reached)
            self.position_accepted.labels(str(k + 1)).inc(accepted)
        if event.receipt_sequence > 0:
            self.receipts.inc()
            self.billed.inc(event.amount_micros)

    def _round(self, event: EngineRound) -> None:
        report = event.report
        self.batch_size.observe(report.batch_size)
        for budget in report.budgets:
            self.budget.observe(budget)
        self.round_seconds.observe(report.round_seconds)
        self.phase_seconds.labels("draft").inc(report.draft_seconds)
        self.phase_seconds.labels("schedule").inc(report.schedule_seconds)
        self.phase_seconds.labels("verify").inc(report.verify_seconds)
        self.round_expected.inc(report.expected_accepted)
        self.round_accepted.inc(report.accepted)
        self.round_committed.inc(report.committed)
        self.round_requests.labels("yes").inc(report.drafted)
        self.round_requests.labels("no").inc(report.batch_size - report.drafted)
