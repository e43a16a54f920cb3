"""The Prometheus text: valid for promtool, and every number follows from the events published."""

from __future__ import annotations

import subprocess
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.api import CorpusFill, DraftCounts
from node.events import AdvertPublished, AdvertSeen, EventBus, JobAdmitted, JobRefused, PeerChange
from node.metrics import MAX_REASONS, NodeMetrics

from .factories import EngineState, engine_info, engine_round, finished, stats


def samples(metrics: NodeMetrics) -> dict[tuple[str, tuple], float]:
    text = metrics.render()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def feed_workload(bus: EventBus) -> None:
    for i in range(3):
        bus.publish(JobAdmitted(job_id=f"{i:032x}", client="ab" * 32, prompt_tokens=12, max_new_tokens=32))
    bus.publish(finished("0" * 32, "completed", stats(20, 8, [8, 6, 4], [6, 4, 1], corpus=DraftCounts(10, 7, 5)),
                         amount=40, sequence=1))
    bus.publish(finished("1" * 32, "completed", stats(10, 5, [5, 3], [3, 1]), amount=20, sequence=2, ttft=1.5))
    bus.publish(finished("2" * 32, "cancelled", stats(2, 1, [1], [0]), amount=4, sequence=3, ttft=None))
    bus.publish(JobRefused(reason="replayed", message="job id seen before"))
    bus.publish(JobRefused(reason="quota", message="too many"))
    bus.publish(JobRefused(reason="quota", message="too many"))
    for budgets, accepted, drafted in [((4, 4), 5, 2), ((3, 2, 0), 2, 2), ((4,), 4, 1)]:   # one request backed off
        bus.publish(engine_round(budgets, accepted, seconds=0.04, drafted=drafted))
    bus.publish(PeerChange(connected_peers=5))
    bus.publish(PeerChange(connected_peers=3))
    bus.publish(AdvertPublished(sequence=1, free_slots=8, queue_depth=0, size_bytes=300))
    bus.publish(AdvertSeen(peer_id="12D3KooWx", accepted=True))
    bus.publish(AdvertSeen(peer_id="12D3KooWy", accepted=False, reason="expired"))


@pytest.fixture
def loaded() -> tuple[NodeMetrics, EngineState]:
    bus = EventBus()
    engine = EngineState(engine_info())
    metrics = NodeMetrics(bus, engine, peer_id="12D3KooWtest")
    feed_workload(bus)
    return metrics, engine


def test_promtool_accepts_the_text(loaded, promtool):
    metrics, _ = loaded
    text, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"" and result.stderr.strip() == b"", "promtool lint findings"


def test_every_name_has_the_prefix(loaded):
    metrics, _ = loaded
    names = {f.name for f in text_string_to_metric_families(metrics.render()[0].decode())}
    assert len(names) > 25 and all(n.startswith("dspark_") for n in names), names


def test_job_counters_follow_events(loaded):
    s = samples(loaded[0])
    assert s[("dspark_jobs_admitted_total", ())] == 3
    assert s[("dspark_jobs_finished_total", (("outcome", "completed"),))] == 2
    assert s[("dspark_jobs_finished_total", (("outcome", "cancelled"),))] == 1
    assert s[("dspark_jobs_finished_total", (("outcome", "failed"),))] == 0
    assert s[("dspark_jobs_refused_total", (("reason", "quota"),))] == 2
    assert s[("dspark_jobs_refused_total", (("reason", "replayed"),))] == 1
    assert s[("dspark_prompt_tokens_total", ())] == 36
    assert s[("dspark_output_tokens_total", ())] == 32
    assert s[("dspark_receipts_total", ())] == 3
    assert s[("dspark_billed_micros_total", ())] == 64
    assert s[("dspark_time_to_first_token_seconds_count", ())] == 2   # the cancelled job had no token
    assert s[("dspark_time_to_first_token_seconds_sum", ())] == pytest.approx(1.8)


def test_speculation_counters_follow_events(loaded):
    s = samples(loaded[0])
    assert s[("dspark_request_rounds_total", ())] == 14
    assert sum(v for k, v in s.items() if k[0] == "dspark_accepted_draft_tokens_total") == 11 + 4 + 0
    assert s[("dspark_request_tau_count", ())] == 3
    reached = {k[1][0][1]: v for k, v in s.items() if k[0] == "dspark_draft_position_reached_total"}
    accepted = {k[1][0][1]: v for k, v in s.items() if k[0] == "dspark_draft_position_accepted_total"}
    assert reached == {"1": 14, "2": 9, "3": 4}
    assert accepted == {"1": 9, "2": 5, "3": 1}


def test_draft_counters_are_labelled_by_source(loaded):
    s = samples(loaded[0])

    def by_source(name: str) -> dict[str, float]:
        return {dict(k[1])["source"]: v for k, v in s.items() if k[0] == name}
    # the first job's corpus drafts; the model drafted the rest of all three jobs'
    assert by_source("dspark_drafted_tokens_total") == {"own": 0, "corpus": 10, "drafter": 16 + 13 + 2}
    assert by_source("dspark_verified_draft_tokens_total") == {"own": 0, "corpus": 7, "drafter": 11 + 8 + 1}
    assert by_source("dspark_accepted_draft_tokens_total") == {"own": 0, "corpus": 5, "drafter": 6 + 4 + 0}


def test_round_metrics_follow_events(loaded):
    s = samples(loaded[0])
    assert s[("dspark_round_batch_size_count", ())] == 3
    assert s[("dspark_round_batch_size_sum", ())] == 6
    assert s[("dspark_round_verify_budget_tokens_count", ())] == 6     # one per request per round
    assert s[("dspark_round_verify_budget_tokens_sum", ())] == 17
    assert s[("dspark_round_verify_budget_tokens_bucket", (("le", "2.0"),))] == 2
    assert s[("dspark_round_duration_seconds_bucket", (("le", "0.05"),))] == 3
    assert s[("dspark_round_committed_tokens_total", ())] == 11 + 6
    assert s[("dspark_round_phase_seconds_total", (("phase", "verify"),))] == pytest.approx(0.06)
    assert s[("dspark_round_requests_total", (("drafted", "yes"),))] == 5
    assert s[("dspark_round_requests_total", (("drafted", "no"),))] == 1


def test_peer_metrics_follow_events(loaded):
    s = samples(loaded[0])
    assert s[("dspark_p2p_peers_connected", ())] == 3          # the latest PeerChange, not a sum
    assert s[("dspark_p2p_adverts_published_total", ())] == 1
    assert s[("dspark_p2p_adverts_seen_total", (("result", "accepted"),))] == 1
    assert s[("dspark_p2p_adverts_seen_total", (("result", "dropped"),))] == 1


def test_engine_gauges_are_read_at_scrape_time(loaded):
    metrics, engine = loaded
    engine.queue_depth, engine.free_slots, engine.active = 4, 0, 8
    s = samples(metrics)
    assert (s[("dspark_engine_queue_depth", ())], s[("dspark_engine_free_slots", ())],
            s[("dspark_engine_active_requests", ())]) == (4, 0, 8)
    engine.queue_depth = 1
    assert samples(metrics)[("dspark_engine_queue_depth", ())] == 1


def test_corpus_gauges_are_read_at_scrape_time(loaded):
    metrics, engine = loaded
    names = ("dspark_lookup_corpus_tokens", "dspark_lookup_corpus_documents", "dspark_lookup_corpus_capacity_tokens")
    assert [samples(metrics)[(n, ())] for n in names] == [0, 0, 0], "no corpus: all zero"
    engine.corpus_fill = CorpusFill(tokens=1200, documents=3, capacity=4096)
    assert [samples(metrics)[(n, ())] for n in names] == [1200, 3, 4096]


def test_node_info_labels(loaded):
    s = samples(loaded[0])
    (labels,) = [dict(k[1]) for k in s if k[0] == "dspark_node_info"]
    assert labels == {"peer_id": "12D3KooWtest", "model": "smollm2-135m-instruct", "method": "ngram",
                      "drafter": "ngram", "device": "cpu", "dtype": "float32"}


def test_refusal_reasons_are_capped():
    bus = EventBus()
    metrics = NodeMetrics(bus, EngineState(engine_info()), peer_id="p")
    for i in range(MAX_REASONS + 20):
        bus.publish(JobRefused(reason=f"reason_{i}", message="x"))
    bus.publish(JobRefused(reason="bad label\n{}", message="x"))
    refused = {k[1][0][1]: v for k, v in samples(metrics).items() if k[0] == "dspark_jobs_refused_total"}
    assert len(refused) == MAX_REASONS + 1
    assert refused["other"] == 21 and sum(refused.values()) == MAX_REASONS + 21


def test_events_from_another_thread_are_counted():
    bus = EventBus()
    metrics = NodeMetrics(bus, EngineState(engine_info()), peer_id="p")
    threads = [threading.Thread(target=lambda: [bus.publish(engine_round((2,), 1, 0.01)) for _ in range(200)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert samples(metrics)[("dspark_round_batch_size_count", ())] == 800
