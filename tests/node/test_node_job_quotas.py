"""The job table's per-client quota memory: it counts what admission needs and forgets the rest."""

from __future__ import annotations

import types

from engine.api import EngineInfo
from node.events import EventBus
from node.jobs import JobTable

INFO = EngineInfo(model_id="m", model_digest=b"", method="ar", drafter_id="", drafter_digest=b"", device="cpu",
                  dtype="float32", max_context=100, max_batch=2, block_size=0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table(clock: Clock) -> JobTable:
    return JobTable(engine=None, ledger=None, events=EventBus(), info=INFO, price_per_mtok_micros=0,
                    price_per_gpu_second_micros=0, clock=clock)


def job(client: bytes, source: str = "203.0.113.7") -> types.SimpleNamespace:
    """What the table reads of a SignedJob."""
    return types.SimpleNamespace(client_key=client, source=source)


def test_clients_quiet_for_a_minute_are_forgotten():
    """A client may sign every job with a fresh key: a week of that must not leave a week of keys."""
    clock = Clock()
    jobs = table(clock)
    for n in range(1000):
        client = n.to_bytes(32, "big")
        jobs.reserve(job(client))
        jobs.release(job(client))
        clock.now += 1.0
    assert len(jobs._admitted) <= 61     # the keys that admitted a job in the last 60 s


def test_a_client_still_admitting_keeps_its_rate_while_others_are_forgotten():
    clock = Clock()
    jobs = table(clock)
    busy = b"b" * 32
    for n in range(100):
        jobs.reserve(job(busy))
        jobs.release(job(busy))
        jobs.reserve(job(n.to_bytes(32, "big")))
        jobs.release(job(n.to_bytes(32, "big")))
        clock.now += 1.0
    assert jobs.load(busy).client_recent == 60      # its admissions of the last 60 s
    assert len(jobs._admitted) <= 1 + 61     # it and the keys seen in the last 60 s


def test_an_address_counts_its_calls_for_a_minute_and_quiet_ones_are_forgotten():
    clock = Clock()
    jobs = table(clock)
    for n in range(5):
        jobs.arrive("203.0.113.7")
        clock.now += 10.0
    assert jobs.arrivals("203.0.113.7") == 5
    assert jobs.arrivals("198.51.100.1") == 0
    clock.now += 15.0      # the first call is 65 s old now, the second 55 s
    assert jobs.arrivals("203.0.113.7") == 4
    for n in range(200):   # a new address a second: only the last minute's stay
        jobs.arrive(f"2001:db8:{n:x}::/64")
        clock.now += 1.0
    assert len(jobs._arrived) <= 61
    assert jobs.arrivals("203.0.113.7") == 0


def test_an_address_holds_its_jobs_until_each_is_released_and_is_then_forgotten():
    jobs = table(Clock())
    held = [job(n.to_bytes(32, "big")) for n in range(3)]       # three keys, one address
    for j in held:
        jobs.reserve(j)
    jobs.reserve(job(b"o" * 32, source="2001:db8::/64"))
    assert (jobs.held("203.0.113.7"), jobs.held("2001:db8::/64")) == (3, 1)
    for j in held:
        jobs.release(j)
    assert jobs.held("203.0.113.7") == 0 and "203.0.113.7" not in jobs._held
