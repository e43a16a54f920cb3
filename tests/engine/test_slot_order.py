"""The line for a slot: free slots go to the tenant holding the fewest, oldest request first within one,
and the order changes no request's output."""

import torch

from engine.api import GenerationRequest, GenerationResult, SamplingParams
from engine.build import build_engine
from engine.config import EngineConfig
from engine.engine import slot_order
from engine.sequence import Sequence


def seq(request_id: str, tenant: str | None) -> Sequence:
    request = GenerationRequest(request_id, (1, 2), SamplingParams(max_new_tokens=1), tenant=tenant)
    return Sequence(request=request, generator=torch.Generator(), tokens=[1, 2], prompt_len=2)


def ids(order: list[Sequence]) -> list[str]:
    return [s.request_id for s in order]


def test_one_tenant_is_first_come_first_served():
    waiting = [seq(f"r{i}", None) for i in range(5)]
    assert ids(slot_order(waiting, [seq("held", None)])) == ["r0", "r1", "r2", "r3", "r4"]


def test_tenants_take_turns_from_what_they_already_hold():
    # a queued four jobs before b and c came; a also holds two slots, b one, c none.
    waiting = [seq("a1", "a"), seq("a2", "a"), seq("a3", "a"), seq("a4", "a"), seq("b1", "b"), seq("c1", "c"),
               seq("b2", "b"), seq("c2", "c")]
    holding = [seq("a0", "a"), seq("a00", "a"), seq("b0", "b")]
    # c (0 held) first; then b and c at one each, b's oldest being older; then c, b, a at two...
    assert ids(slot_order(waiting, holding)) == ["c1", "b1", "c2", "a1", "b2", "a2", "a3", "a4"]


def test_a_freed_slot_goes_to_the_tenant_holding_fewer_and_outputs_stay_as_alone(tiny_llama):
    config = EngineConfig(model=str(tiny_llama), method="ar", max_batch=2, max_context=128)
    engine, alone = build_engine(config), build_engine(config)
    a = [GenerationRequest(f"a{i}", (3, 14, 15 + i), SamplingParams(max_new_tokens=4 + 3 * i), tenant="a")
         for i in range(4)]
    b = GenerationRequest("b0", (92, 65), SamplingParams(max_new_tokens=5), tenant="b")
    for request in a:
        engine.add(request)
    started, results = [], {}
    while engine.has_work:
        events, _ = engine.step()
        started += [s.request_id for s in engine.prefilling + engine.active if s.request_id not in started]
        if engine.waiting:
            assert sorted(engine.line.values()) == list(range(1, len(engine.waiting) + 1))
        results.update({e.request_id: e for e in events if isinstance(e, GenerationResult)})
        if started == ["a0", "a1"] and b not in [s.request for s in engine.waiting]:
            engine.add(b)       # a holds both slots, and two more of a's wait
    # b came last, but a held a slot when the first one freed and b none.
    assert started == ["a0", "a1", "b0", "a2", "a3"]
    assert engine.line == {}
    for request in [*a, b]:
        assert results[request.request_id].output_ids == alone.generate(request).output_ids
