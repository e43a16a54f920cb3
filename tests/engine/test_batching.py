"""Continuous batching: a request's fp32 greedy output does not depend on what runs beside it,
when it joins or leaves, or how many drafts the scheduler verifies for it."""

import asyncio
import random
import threading

import pytest

from engine.api import GenerationRequest, GenerationResult, RequestRejected, SamplingParams
from engine.async_engine import AsyncEngine
from engine.bench import chat_ids
from engine.build import build_engine
from engine.config import EngineConfig
from engine.drafters.base import Proposal
from tests.conftest import eval_prompts


def random_lengths(seed):
    rng = random.Random(seed)

    def schedule(seqs, proposal: Proposal, caps):
        return [rng.randint(0, min(len(t), c)) for t, c in zip(proposal.tokens, caps)], 0.0
    return schedule


def solo(engine, prompt, n):
    return engine.generate(GenerationRequest("solo", prompt, SamplingParams(max_new_tokens=n))).output_ids


@pytest.mark.parametrize("seed", [0, 1])
def test_joins_leaves_and_random_budgets_keep_outputs(tiny_llama, seed):
    rng = random.Random(seed)
    plain = build_engine(EngineConfig(model=str(tiny_llama), method="ar", max_batch=1, max_context=128))
    batched = build_engine(EngineConfig(model=str(tiny_llama), method="ngram", max_batch=4, max_context=128,
                                        block_size=4))
    batched.schedule = random_lengths(seed)
    requests = []
    for i in range(7):
        prompt = tuple(rng.randrange(0, 49152) for _ in range(rng.randint(3, 12))) * 2
        requests.append(GenerationRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=rng.randint(5, 30))))
    pending, results, step = list(requests), {}, 0
    while pending or batched.has_work:
        if pending and step % 3 == 0:  # requests arrive over time; the queue holds what has no slot
            batched.add(pending.pop(0))
        events, _ = batched.step()
        results.update({e.request_id: e for e in events if isinstance(e, GenerationResult)})
        step += 1
    for r in requests:
        assert results[r.request_id].output_ids == solo(plain, r.prompt_ids, r.sampling.max_new_tokens)


def test_real_prompts_batched_equal_alone(smollm_fp32):
    prompts = eval_prompts("humaneval.jsonl", 2) + eval_prompts("mt-bench.jsonl", 2)
    ids = [tuple(chat_ids(smollm_fp32.tokenizer, p)) for p in prompts]
    plain = build_engine(EngineConfig(method="ar", max_batch=1, max_context=1024), smollm_fp32)
    batched = build_engine(EngineConfig(method="ngram", max_batch=4, max_context=1024, block_size=4), smollm_fp32)
    for i, p in enumerate(ids):
        batched.add(GenerationRequest(f"r{i}", p, SamplingParams(max_new_tokens=24 + 4 * i)))
    results = {}
    while batched.has_work:
        events, report = batched.step()
        if report is not None:
            assert report.verify_tokens <= batched.config.verify_budget
        results.update({e.request_id: e for e in events if isinstance(e, GenerationResult)})
    for i, p in enumerate(ids):
        assert results[f"r{i}"].output_ids == solo(plain, p, 24 + 4 * i)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_decode(tiny_llama):
    """Chunked prefill: a 100-token prompt joining a running request is cached 16 tokens a step;
    the running request gets a token every one of those steps, and both outputs equal solo runs."""
    config = dict(model=str(tiny_llama), method="ar", max_context=256, prefill_chunk=16)
    engine = build_engine(EngineConfig(**config, max_batch=2))
    short, long = (3, 14, 15, 92), tuple(random.Random(5).randrange(0, 49152) for _ in range(100))
    engine.add(GenerationRequest("running", short, SamplingParams(max_new_tokens=30)))
    engine.step()
    engine.add(GenerationRequest("joining", long, SamplingParams(max_new_tokens=5)))
    for step in range(7):                      # ceil(100 / 16) steps to cache the prompt
        events, _ = engine.step()
        got = {e.request_id for e in events}
        assert "running" in got, f"the running request stalled at step {step}"
        assert ("joining" in got) == (step == 6), f"first token of the long prompt at step {step}"
        if step < 6:
            assert engine.prefilling[0].kv_len == 16 * (step + 1)
    results = {}
    while engine.has_work:
        results.update({e.request_id: e for e in engine.step()[0] if isinstance(e, GenerationResult)})
    plain = build_engine(EngineConfig(**config, max_batch=1))
    assert results["running"].output_ids == solo(plain, short, 30)
    assert results["joining"].output_ids == solo(plain, long, 5)


def test_short_prompts_share_one_prefill_forward_and_a_cancel_mid_prefill_frees_the_slot(tiny_llama):
    engine = build_engine(EngineConfig(model=str(tiny_llama), method="ar", max_batch=4, max_context=128,
                                       prefill_chunk=16))
    calls = []
    forward = engine.model.forward
    engine.model.forward = lambda tokens, *a, **kw: calls.append(tuple(tokens.shape)) or forward(tokens, *a, **kw)
    prompts = [(5, 6, 7, 8, 9), (10, 11, 12, 13, 14), (20, 21, 22, 23, 24), tuple(range(30, 60))]
    for i, p in enumerate(prompts):
        engine.add(GenerationRequest(f"r{i}", p, SamplingParams(max_new_tokens=4)))
    engine.step()
    assert calls[0] == (4, 5)                   # 5 + 5 + 5 + 1 tokens: one ragged forward
    assert [s.request_id for s in engine.active] == ["r0", "r1", "r2"] and engine.prefilling[0].kv_len == 1
    engine.cancel("r3")
    events, _ = engine.step()
    assert any(isinstance(e, GenerationResult) and e.finish_reason == "cancelled" for e in events)
    assert not engine.prefilling and len(engine.free_slots) == 1


@pytest.mark.asyncio
async def test_cancel_mid_stream_frees_the_slot(tiny_llama):
    engine = AsyncEngine(build_engine(EngineConfig(model=str(tiny_llama), max_batch=1, max_context=512)))
    await engine.start()
    try:
        stream = engine.generate(GenerationRequest("long", (1, 2, 3), SamplingParams(max_new_tokens=400)))
        async for event in stream:
            break  # the client goes away after its first chunk
        await stream.aclose()
        request = GenerationRequest("next", (4, 5), SamplingParams(max_new_tokens=3))
        results = [e async for e in engine.generate(request)]
        assert isinstance(results[-1], GenerationResult) and results[-1].finish_reason == "length"
        assert engine.free_slots == 1 and engine.active == 0
    finally:
        await engine.stop()


@pytest.mark.asyncio
async def test_stream_concatenates_to_final_text(tiny_llama):
    engine = AsyncEngine(build_engine(EngineConfig(model=str(tiny_llama), method="ngram", max_batch=2)))
    await engine.start()
    try:
        request = GenerationRequest("s", (7, 7, 8, 7, 7), SamplingParams(max_new_tokens=20))
        events = [e async for e in engine.generate(request)]
        chunks, final = events[:-1], events[-1]
        assert "".join(c.text for c in chunks) == final.text
        assert sum((c.token_ids for c in chunks), ()) == final.output_ids
    finally:
        await engine.stop()


@pytest.mark.asyncio
async def test_a_failing_model_fails_requests_and_wakes_the_supervisor(tiny_llama):
    engine = AsyncEngine(build_engine(EngineConfig(model=str(tiny_llama), max_batch=1)))

    def broken_forward(*args, **kwargs):
        raise RuntimeError("CUDA error: device lost")
    engine.engine.model.forward = broken_forward
    await engine.start()
    with pytest.raises(RuntimeError, match="engine failed"):
        async for _ in engine.generate(GenerationRequest("x", (1, 2), SamplingParams(max_new_tokens=4))):
            pass
    with pytest.raises(RuntimeError, match="device lost"):
        await asyncio.wait_for(engine.wait(), 10)
    await engine.stop()


async def outcome(engine: AsyncEngine, request_id: str) -> BaseException | None:
    """How a short request ends: None when it completes, else the error it ended with."""
    try:
        async for _ in engine.generate(GenerationRequest(request_id, (1, 2), SamplingParams(max_new_tokens=4))):
            pass
    except (RuntimeError, RequestRejected) as exc:
        return exc
    return None


@pytest.mark.asyncio
async def test_requests_that_reach_a_failed_engine_are_failed_not_left_waiting(tiny_llama):
    """One request arrives while the failing round runs (it is still in the inbox when the engine
    thread dies), another after: both end, with an error, instead of waiting forever."""
    engine = AsyncEngine(build_engine(EngineConfig(model=str(tiny_llama), max_batch=1)))
    entered, fail = threading.Event(), threading.Event()

    def failing_forward(*args, **kwargs):
        entered.set()
        fail.wait(10)
        raise RuntimeError("CUDA error: device lost")
    engine.engine.model.forward = failing_forward
    await engine.start()

    first = asyncio.create_task(outcome(engine, "first"))
    await asyncio.to_thread(entered.wait, 10)
    during = asyncio.create_task(outcome(engine, "during"))

    async def queued() -> None:         # "during" is in the inbox, the engine thread in the forward
        while engine.queue_depth == 0:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(queued(), 10)
    fail.set()
    failures = await asyncio.wait_for(asyncio.gather(first, during, outcome(engine, "after")), 10)
    assert all(exc is not None for exc in failures), failures
    with pytest.raises(RuntimeError, match="device lost"):
        await engine.wait()
    await engine.stop()


@pytest.mark.asyncio
async def test_an_add_that_fails_ends_every_request_that_arrived_with_it(tiny_llama):
    """Requests reach the engine thread in batches (its inbox); when adding one raises something no
    refusal, the engine fails, and the requests behind it in the batch must end too, not wait forever."""
    engine = AsyncEngine(build_engine(EngineConfig(model=str(tiny_llama), max_batch=1)))
    entered, release = threading.Event(), threading.Event()
    forward, add = engine.engine.model.forward, engine.engine.add

    def held_forward(*args, **kwargs):
        entered.set()
        release.wait(10)
        return forward(*args, **kwargs)

    def failing_add(request):
        if request.request_id == "bad":
            raise RuntimeError("tokenizer state lost")
        return add(request)
    engine.engine.model.forward, engine.engine.add = held_forward, failing_add
    await engine.start()

    held = asyncio.create_task(outcome(engine, "held"))
    await asyncio.to_thread(entered.wait, 10)
    behind = [asyncio.create_task(outcome(engine, request_id)) for request_id in ("bad", "good")]
    while engine.queue_depth < 2:       # both in the inbox while the engine thread is in the forward
        await asyncio.sleep(0.01)
    release.set()
    failures = await asyncio.wait_for(asyncio.gather(*behind), 10)
    assert all(isinstance(exc, RuntimeError) for exc in failures), failures
    await held
    with pytest.raises(RuntimeError, match="tokenizer state lost"):
        await engine.wait()
    await engine.stop()
