"""The gateway's memory of workers that failed it (node/p2p/recent_failures.py) and how selection
uses it."""

from __future__ import annotations

from dspark.v1.advert_pb2 import CapacityAdvert, ModelOffer
from node.p2p.failover import Attempt
from node.p2p.recent_failures import DEMOTION_S, RecentFailures
from node.p2p.selection import rank


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_worker_that_failed_is_demoted_until_it_completes_a_job_or_the_time_passes():
    clock = Clock()
    failures = RecentFailures(clock)
    failures.record([Attempt("refuser", "e", "refused", reason="not_allowed"), Attempt("dead", "e", "unreachable"),
                     Attempt("crashed", "e", "died"), Attempt("good", "e", "completed")])
    assert failures.demoted() == {"refuser", "dead", "crashed"}
    failures.record([Attempt("crashed", "e", "completed")])
    assert failures.demoted() == {"refuser", "dead"}
    clock.now += DEMOTION_S - 1
    assert failures.demoted() == {"refuser", "dead"}
    clock.now += 2
    assert failures.demoted() == frozenset()


def test_a_refusal_of_the_request_itself_demotes_no_one():
    failures = RecentFailures(Clock())
    failures.record([Attempt("w", "e", "refused", reason=reason)
                     for reason in ("too_long", "bad_sampling", "malformed")])
    assert failures.demoted() == frozenset()


def test_demoted_workers_come_after_the_others_in_their_own_order():
    ads = [CapacityAdvert(peer_id=peer, grpc_endpoint="127.0.0.1:1", models=[ModelOffer(id="m")],
                          price_per_mtok_micros=price, free_slots=1, tokens_per_second=10.0)
           for peer, price in (("cheap", 1), ("cheaper", 0), ("dear", 900))]
    assert [c.peer_id for c in rank(ads, "m")] == ["cheaper", "cheap", "dear"]
    demoted = frozenset({"cheaper", "cheap"})
    assert [c.peer_id for c in rank(ads, "m", demoted=demoted)] == ["dear", "cheaper", "cheap"]
