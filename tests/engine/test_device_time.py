"""A request's device time (what a time price bills, node/receipts.py) is its share of the passes it
was in: over a batch the shares add up to the device's busy time, not that times the batch size."""

import time

import pytest

from engine.api import GenerationRequest, GenerationResult, RequestStats, SamplingParams, share_pass_time
from engine.build import build_engine
from engine.config import EngineConfig


def test_a_pass_is_split_by_the_tokens_each_request_put_in_it():
    a, b, c = RequestStats(), RequestStats(), RequestStats(device_seconds=1.0)
    share_pass_time([(a, 1), (b, 3), (c, 4)], 0.8)
    assert (a.device_seconds, b.device_seconds, c.device_seconds) == pytest.approx((0.1, 0.3, 1.4))


def run(engine, requests):
    """Add `requests` at once and step until they finish: (results by id, rounds' reports, wall time of
    the steps)."""
    for request in requests:
        engine.add(request)
    results, reports, busy = {}, [], 0.0
    while engine.has_work:
        started = time.perf_counter()
        events, report = engine.step()
        busy += time.perf_counter() - started
        results.update({e.request_id: e for e in events if isinstance(e, GenerationResult)})
        reports.append(report)
    return results, [r for r in reports if r is not None], busy


def test_batched_requests_split_the_device_time_and_alone_one_gets_all_of_it(tiny_llama):
    config = EngineConfig(model=str(tiny_llama), method="ngram", max_batch=4, max_context=128, block_size=4)
    engine = build_engine(config)
    prompts = [tuple(range(5 + 3 * i, 25 + 7 * i)) * 2 for i in range(4)]
    results, reports, busy = run(engine, [GenerationRequest(f"r{i}", p, SamplingParams(max_new_tokens=12 + 4 * i))
                                          for i, p in enumerate(prompts)])
    stats = [results[f"r{i}"].stats for i in range(4)]
    # The four prompts went through one prefill pass (the chunk holds them all), so each request's
    # prefill wall time is that pass; every round's time is in a report.
    assert len({s.prefill_seconds for s in stats}) == 1
    passes = stats[0].prefill_seconds + sum(r.round_seconds for r in reports)
    assert sum(s.device_seconds for s in stats) == pytest.approx(passes, rel=1e-9)
    assert passes <= busy
    for s in stats:
        # Each request waited through passes it shared: its bill is a part of that wait.
        assert 0 < s.device_seconds < s.prefill_seconds + s.decode_seconds
    # The wall times count a shared pass once per request in it: billed, four requests decoding
    # together would pay for about four devices.
    assert sum(s.prefill_seconds + s.decode_seconds for s in stats) > 2 * passes

    alone, _, _ = run(engine, [GenerationRequest("alone", prompts[0], SamplingParams(max_new_tokens=12))])
    s = alone["alone"].stats
    assert s.device_seconds == pytest.approx(s.prefill_seconds + s.decode_seconds, rel=1e-9)
