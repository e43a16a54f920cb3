"""What the dashboard's JSON is made of: series, curves, jobs and problems folded from events."""

from __future__ import annotations

import pytest

from engine.api import DraftCounts
from node.activity import MAX_PEERS_SHOWN, SERIES_BUCKET_SECONDS, SERIES_SPAN_SECONDS, Activity
from node.events import AdvertPublished, AdvertSeen, EventBus, JobAdmitted, JobProgress, JobRefused, PeerChange

from .factories import engine_round, finished, stats

T0 = 1_700_000_000.0  # a multiple of the bucket width


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup() -> tuple[EventBus, Activity, Clock]:
    bus, clock = EventBus(), Clock()
    return bus, Activity(bus, clock=clock), clock


def test_series_buckets_tokens_per_second_and_tau(setup):
    bus, activity, clock = setup
    bus.publish(engine_round((4, 4), accepted=6, seconds=0.1, at=T0 + 1))    # commits 8 for 2 request-rounds
    bus.publish(engine_round((4,), accepted=2, seconds=0.1, at=T0 + 2))      # commits 3 for 1
    bus.publish(engine_round((2, 2), accepted=0, seconds=0.1, at=T0 + SERIES_BUCKET_SECONDS + 1))
    clock.now = T0 + 2 * SERIES_BUCKET_SECONDS
    points = activity.series()["points"]
    assert [p["t"] for p in points] == [T0, T0 + SERIES_BUCKET_SECONDS]
    assert points[0]["tokens_per_second"] == pytest.approx(11 / SERIES_BUCKET_SECONDS)
    assert points[0]["tau"] == pytest.approx(11 / 3, abs=1e-4)
    assert points[1]["tau"] == pytest.approx(1.0) and points[1]["rounds"] == 1


def test_current_bucket_rate_uses_elapsed_time(setup):
    bus, activity, clock = setup
    bus.publish(engine_round((4,), accepted=3, seconds=0.1, at=T0 + 1))
    clock.now = T0 + 2
    assert activity.series()["points"][0]["tokens_per_second"] == pytest.approx(4 / 2)


def test_series_keeps_only_the_last_hour(setup):
    bus, activity, clock = setup
    bus.publish(engine_round((1,), accepted=1, seconds=0.1, at=T0))
    bus.publish(engine_round((1,), accepted=1, seconds=0.1, at=T0 + SERIES_SPAN_SECONDS + 30))
    clock.now = T0 + SERIES_SPAN_SECONDS + 31
    assert [p["t"] for p in activity.series()["points"]] == [T0 + SERIES_SPAN_SECONDS + 30]


def test_acceptance_curve_sums_positions_and_survival(setup):
    bus, activity, _ = setup
    bus.publish(finished("a", "completed", stats(20, 8, [8, 6, 4], [6, 4, 1]), amount=1, sequence=1))
    bus.publish(finished("b", "completed", stats(10, 4, [4, 2], [2, 0]), amount=1, sequence=2))
    curve = activity.acceptance()["positions"]
    assert [(p["position"], p["reached"], p["accepted"]) for p in curve] == [(1, 12, 8), (2, 8, 4), (3, 4, 1)]
    assert [p["acceptance"] for p in curve] == pytest.approx([8 / 12, 0.5, 0.25], abs=1e-4)
    assert curve[2]["survival"] == pytest.approx(8 / 12 * 0.5 * 0.25, abs=1e-4)


def test_acceptance_at_a_position_never_reached_is_unknown_not_zero(setup):
    bus, activity, _ = setup
    # every verify budget stopped at 2 drafts: the third position is in the curve, never reached
    bus.publish(finished("a", "completed", stats(20, 8, [8, 6, 0], [6, 6, 0]), amount=1, sequence=1))
    third = activity.acceptance()["positions"][2]
    assert (third["reached"], third["acceptance"], third["survival"]) == (0, None, None)


def test_draft_sources_sum_jobs_by_source(setup):
    bus, activity, _ = setup
    assert [(r["source"], r["drafted"], r["acceptance"]) for r in activity.draft_sources()] == [
        ("own", 0, None), ("corpus", 0, None), ("drafter", 0, None)]
    bus.publish(finished("a", "completed", stats(20, 8, [8, 6, 4], [6, 4, 1], corpus=DraftCounts(10, 8, 6)),
                         amount=1, sequence=1))
    bus.publish(finished("b", "completed", stats(10, 4, [4, 2], [2, 0]), amount=1, sequence=2))
    rows = {r["source"]: r for r in activity.draft_sources()}
    assert rows["corpus"] == {"source": "corpus", "drafted": 10, "verified": 8, "accepted": 6, "acceptance": 0.75}
    # the model drafted the rest: job a's 26 - 10 drafted, 18 - 8 verified, 11 - 6 accepted, and all of job b's
    assert rows["drafter"] == {"source": "drafter", "drafted": 16 + 10, "verified": 10 + 6, "accepted": 5 + 2,
                               "acceptance": round(7 / 16, 4)}
    assert rows["own"]["drafted"] == 0 and rows["own"]["acceptance"] is None


def test_budget_grouped_by_concurrency(setup):
    bus, activity, _ = setup
    bus.publish(engine_round((6,), accepted=5, seconds=0.05))
    bus.publish(engine_round((4,), accepted=1, seconds=0.15))
    bus.publish(engine_round((3, 2, 1, 2), accepted=4, seconds=0.2))
    bus.publish(engine_round((0, 0, 0, 0), accepted=0, seconds=0.1, drafted=1))
    rows = {r["batch_size"]: r for r in activity.budget()["rows"]}
    assert sorted(rows) == [1, 4]
    assert rows[1]["rounds"] == 2 and rows[1]["mean_budget"] == pytest.approx(5.0)
    assert rows[1]["tau"] == pytest.approx((6 + 2) / 2)
    assert rows[1]["mean_round_seconds"] == pytest.approx(0.1)
    assert rows[4]["mean_budget"] == pytest.approx(1.0) and rows[4]["mean_accepted"] == pytest.approx(0.5)
    assert rows[1]["drafted_share"] == 1.0 and rows[4]["drafted_share"] == pytest.approx(5 / 8)


def test_job_lifecycle_active_speed_then_recent(setup):
    bus, activity, clock = setup
    bus.publish(JobAdmitted(job_id="j1", client="c1", prompt_tokens=9, max_new_tokens=64, at=T0))
    bus.publish(JobProgress(job_id="j1", output_tokens=1, elapsed_seconds=0.5, first_token=True))
    bus.publish(JobProgress(job_id="j1", output_tokens=3, elapsed_seconds=0.6))
    assert activity.jobs()["active"][0]["tokens_per_second"] is None     # a 0.1 s burst is not a speed
    bus.publish(JobProgress(job_id="j1", output_tokens=21, elapsed_seconds=2.5))
    clock.now = T0 + 3
    (job,) = activity.jobs()["active"]
    assert job["tokens_per_second"] == pytest.approx(10.0) and job["output_tokens"] == 21
    assert job["age_seconds"] == pytest.approx(3.0)
    assert activity.live()["tokens_per_second"] == pytest.approx(10.0)
    bus.publish(finished("j1", "completed", stats(30, 10, [10], [5], busy_seconds=3.0), amount=60, sequence=7))
    jobs = activity.jobs()
    assert jobs["active"] == []
    (recent,) = jobs["recent"]
    assert (recent["output_tokens"], recent["amount_micros"], recent["receipt_sequence"]) == (30, 60, 7)
    assert recent["tokens_per_second"] == pytest.approx(10.0) and recent["admitted_at"] == T0
    assert jobs["counts"]["admitted"] == 1 and jobs["counts"]["completed"] == 1


def test_refusals_and_failures_are_problems_newest_first(setup):
    bus, activity, _ = setup
    bus.publish(JobRefused(reason="expired", message="job expired 3 s ago", client="c9"))
    bus.publish(finished("j2", "failed", stats(3, 1, [1], [0]), amount=0, sequence=4))
    problems = activity.problems()
    assert [(p["kind"], p["reason"]) for p in problems] == [("failed", "job_failed"), ("refused", "expired")]
    assert problems[1]["message"] == "job expired 3 s ago"


def test_refusals_are_counted_per_reason_beyond_the_list_kept(setup):
    bus, activity, _ = setup
    for _ in range(150):          # more than the problems list keeps
        bus.publish(JobRefused(reason="rate_limited", message="203.0.113.7 sent 600 jobs"))
    bus.publish(JobRefused(reason="price_too_low", message="price cap 1", client="c9"))
    assert activity.refused_by_reason() == {"rate_limited": 150, "price_too_low": 1}
    assert len(activity.problems()) < 151


def test_peers_and_adverts(setup):
    bus, activity, _ = setup
    bus.publish(PeerChange(connected_peers=2))
    bus.publish(AdvertPublished(sequence=5, free_slots=3, queue_depth=1, size_bytes=410))
    for i in range(MAX_PEERS_SHOWN + 5):
        bus.publish(AdvertSeen(peer_id=f"peer{i}", accepted=i % 2 == 0, reason="" if i % 2 == 0 else "stale",
                               at=T0 + i))
    peers = activity.peers()
    assert peers["connected"] == 2 and peers["adverts_published"] == 1
    assert peers["recent_adverts"][0]["sequence"] == 5
    assert peers["adverts_seen"] == {"accepted": 35, "dropped": 34}
    assert len(peers["peers_seen"]) == MAX_PEERS_SHOWN
    assert peers["peers_seen"][0]["peer_id"] == f"peer{MAX_PEERS_SHOWN + 4}"   # newest first, oldest evicted
    assert "peer0" not in {p["peer_id"] for p in peers["peers_seen"]}
