"""The worker choice policy (node/p2p/selection.py), one rule per test."""

from __future__ import annotations

from dspark.v1.advert_pb2 import CapacityAdvert, ModelOffer
from node.p2p.selection import over_caps, rank


def advert(peer: str, model: str = "m", price: int = 100, free: int = 1, queue: int = 0, tps: float = 10.0):
    return CapacityAdvert(peer_id=peer, grpc_endpoint="127.0.0.1:1", models=[ModelOffer(id=model)],
                          price_per_mtok_micros=price, free_slots=free, queue_depth=queue, tokens_per_second=tps)


def order(adverts, **kw) -> list[str]:
    return [c.peer_id for c in rank(adverts, "m", **kw)]


def test_only_workers_serving_the_model_within_the_price_cap():
    ads = [advert("a", model="other"), advert("b", price=500), advert("c", price=100)]
    assert order(ads, max_price_per_mtok_micros=200) == ["c"]
    assert order(ads) == ["c", "b"]


def test_a_draining_worker_is_never_chosen():
    """It would refuse the job (shutting_down); saturated workers are still tried after the free ones."""
    draining = advert("leaving", price=1)
    draining.draining = True
    assert order([draining, advert("busy", free=0, queue=9), advert("dear", price=900)]) == ["dear", "busy"]


def timed(peer: str, price: int, per_second: int, tps: float = 10.0) -> CapacityAdvert:
    ad = advert(peer, price=price, tps=tps)
    ad.price_per_gpu_second_micros = per_second
    return ad


def test_a_gpu_second_cap_skips_workers_that_charge_more_for_time():
    ads = [timed("timed", 1, 50, tps=1e6), advert("untimed", price=900)]    # 1 + 50 per Mtok with its time
    assert order(ads) == ["timed", "untimed"]
    assert order(ads, max_price_per_gpu_second_micros=50) == ["timed", "untimed"]
    assert order(ads, max_price_per_gpu_second_micros=49) == ["untimed"]    # it would refuse the job
    assert order(ads, max_price_per_gpu_second_micros=0) == ["untimed"]     # 0 agrees to no time charge


def test_the_time_charge_counts_in_the_price_at_the_advertised_speed():
    # 0 per token but 1,000 per GPU-second at 10 tokens/s is 100,000,000 per million tokens.
    ads = [timed("free-tokens-dear-time", 0, 1_000), advert("honest", price=5_000)]
    assert order(ads) == ["honest", "free-tokens-dear-time"]
    # At 100 tokens/s, 2 per GPU-second is 20,000 per million tokens: 120,000 in all, below 200,000.
    ads = [timed("timed", 100_000, 2, tps=100), advert("untimed", price=200_000)]
    assert order(ads) == ["timed", "untimed"]


def test_a_time_price_at_an_unmeasured_speed_counts_as_one_token_a_second():
    # 1 per GPU-second at 1 token/s: 1,000,000 per million tokens.
    unmeasured = timed("unmeasured", 0, 1, tps=0)
    assert order([unmeasured, advert("cheaper", price=999_999)]) == ["cheaper", "unmeasured"]
    assert order([unmeasured, advert("dearer", price=1_000_001)]) == ["unmeasured", "dearer"]


def test_over_caps_names_each_price_above_its_cap():
    timed = advert("timed", price=300)
    timed.price_per_gpu_second_micros = 50
    assert over_caps(timed) == over_caps(timed, 300, 50) == ""
    assert over_caps(timed, max_price_per_gpu_second_micros=49) == "50 micros per GPU-second, above the cap of 49"
    assert over_caps(timed, 299, 0) == ("300 micros per million tokens, above the cap of 299 and "
                                        "50 micros per GPU-second, above the cap of 0")


def test_excluded_workers_are_skipped():
    assert order([advert("a"), advert("b")], exclude=frozenset({"a"})) == ["b"]


def test_free_capacity_before_price_and_saturated_by_queue():
    ads = [advert("full-short", price=1, free=0, queue=1), advert("full-long", price=1, free=0, queue=9),
           advert("free-dear", price=900, free=1)]
    assert order(ads) == ["free-dear", "full-short", "full-long"]


def test_cheaper_then_faster_then_closer():
    ads = [advert("slow", tps=5), advert("fast", tps=50), advert("cheap", price=10, tps=1)]
    assert order(ads) == ["cheap", "fast", "slow"]
    ties = [advert("far"), advert("near"), advert("unknown")]
    assert order(ties, latencies={"far": 0.2, "near": 0.01}) == ["near", "far", "unknown"]


def test_non_finite_speed_counts_as_unmeasured():
    assert order([advert("nan", tps=float("nan")), advert("ok", tps=1.0)]) == ["ok", "nan"]
