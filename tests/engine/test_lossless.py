"""fp32 greedy speculative decoding is token-for-token plain decoding, on real prompts."""

import dataclasses

import pytest

from engine.api import GenerationRequest, SamplingParams, TokenChunk
from engine.build import build_engine
from engine.config import EngineConfig
from tests.conftest import eval_prompts

N_TOKENS = 48


def chat(tokenizer, text):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return tuple(ids if isinstance(ids, list) else ids["input_ids"])


@pytest.fixture(scope="module")
def engines(smollm_fp32):
    return {m: build_engine(EngineConfig(method=m, max_batch=1, max_context=2048, block_size=5), smollm_fp32)
            for m in ("ar", "ngram")}


def run(engine, ids, n, **sampling):
    return engine.generate(GenerationRequest("r", ids, SamplingParams(max_new_tokens=n, **sampling)))


@pytest.mark.parametrize("prompt", eval_prompts("humaneval.jsonl", 2) + eval_prompts("mt-bench.jsonl", 1))
def test_ngram_equals_plain_decoding(engines, smollm_fp32, prompt):
    ids = chat(smollm_fp32.tokenizer, prompt)
    plain = run(engines["ar"], ids, N_TOKENS)
    spec = run(engines["ngram"], ids, N_TOKENS)
    assert spec.output_ids == plain.output_ids
    assert spec.text == plain.text
    assert spec.stats.rounds < plain.stats.rounds  # it did speculate, and it paid off


def test_eos_edge(engines, smollm_fp32):
    """A short answer ends on EOS inside a round; nothing is emitted past it."""
    ids = chat(smollm_fp32.tokenizer, "Reply with the single word: yes")
    plain = run(engines["ar"], ids, 64)
    spec = run(engines["ngram"], ids, 64)
    assert plain.finish_reason == "stop" and len(plain.output_ids) < 64
    assert spec.output_ids == plain.output_ids and spec.finish_reason == "stop"
    assert spec.output_ids[-1] in smollm_fp32.eos_token_ids


@pytest.mark.parametrize("n", [1, 2, 3, 9])
def test_max_token_edges(engines, smollm_fp32, n):
    ids = chat(smollm_fp32.tokenizer, "Write a Python function that reverses a list, then repeat it.")
    plain = run(engines["ar"], ids, n)
    spec = run(engines["ngram"], ids, n)
    assert len(spec.output_ids) == n and spec.output_ids == plain.output_ids
    assert spec.finish_reason == "length"


def streamed(engine, request):
    """The request's result and the token ids its chunks streamed."""
    engine.add(request)
    ids = []
    while engine.has_work:
        for event in engine.step()[0]:
            if isinstance(event, TokenChunk):
                ids += event.token_ids
            elif event.request_id == request.request_id:
                return event, tuple(ids)


def test_a_stop_string_inside_a_verified_block_ends_the_output_where_plain_decoding_does(engines, smollm_fp32):
    """Tokens a block commits past the one that completes a stop string are neither returned, streamed
    nor counted (as output or as accepted drafts): the output is plain decoding's, token for token."""
    ids = chat(smollm_fp32.tokenizer, "Write a Python function that reverses a list, then repeat it.")
    text = run(engines["ar"], ids, N_TOKENS).text
    for k in range(10, 45, 7):
        sampling = SamplingParams(max_new_tokens=N_TOKENS, stop=(text[k:k + 3],))
        plain = engines["ar"].generate(GenerationRequest("p", ids, sampling))
        spec, sent = streamed(engines["ngram"], GenerationRequest("s", ids, sampling))
        assert plain.finish_reason == spec.finish_reason == "stop"
        assert spec.output_ids == plain.output_ids and spec.text == plain.text
        assert sent == spec.output_ids and spec.stats.output_tokens == len(plain.output_ids)
        # the dropped tokens' drafts are not signed as accepted either (as after an accepted EOS)
        stats = spec.stats
        assert stats.accepted_tokens + stats.rounds <= len(spec.output_ids)
        assert stats.accepted_tokens == sum(stats.accepted_at) == sum(c.accepted for c in stats.by_source.values())


def test_drafts_verified_after_an_accepted_eos_are_not_counted_as_accepted(engines, smollm_fp32):
    """Each token of the reply in turn is made the EOS: the output ends on it as plain decoding's does,
    and a block that ran on past an accepted EOS counts only the drafts up to it as accepted
    (reference §4.3 step 5), so the stats a receipt signs never claim more drafts than were emitted."""
    ids = chat(smollm_fp32.tokenizer, "Write a Python function that reverses a list, then repeat it.")
    reply = run(engines["ar"], ids, N_TOKENS).output_ids
    for pos in [p for p in range(1, 12) if reply[p] not in reply[:p]]:
        target = dataclasses.replace(smollm_fp32, eos_token_ids=(reply[pos],))
        spec = run(build_engine(EngineConfig(method="ngram", max_batch=1, max_context=2048, block_size=5), target),
                   ids, N_TOKENS)
        assert spec.output_ids == reply[:pos + 1] and spec.finish_reason == "stop"
        assert spec.stats.accepted_tokens + spec.stats.rounds <= len(spec.output_ids)
        # τ counts what the rounds committed: no bonus after an accepted EOS (reference §4.4)
        assert spec.stats.round_tokens == len(spec.output_ids) - 1
