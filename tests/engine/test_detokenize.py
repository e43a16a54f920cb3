"""Incremental decoding: the streamed text is the whole decode, stop strings cut where they first occur,
and nothing streamed is taken back."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from engine.api import GenerationRequest, GenerationResult, SamplingParams, TokenChunk
from engine.bench import chat_ids
from engine.build import build_engine
from engine.config import EngineConfig
from engine.detokenize import DecodeState, Detokenizer
from tests.drafters.helpers import request

# multi-byte characters (split over byte-level tokens), code, a special token at the end
TEXT = "Hello wörld — 你好，世界! 🙂🚀 café naïve\n```python\ndef f(x):\n    return x**2\n```\n" * 2


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.mark.parametrize("source", ["text", "random ids"])
def test_pieces_add_up_to_the_whole_decode(tokenizer, source):
    rng = random.Random(0)
    detok = Detokenizer(tokenizer)
    for trial in range(40):
        if source == "text":
            ids = tokenizer.encode(TEXT, add_special_tokens=False) + [tokenizer.eos_token_id]
        else:   # byte tokens in any order: incomplete and invalid UTF-8 sequences
            ids = [rng.randrange(len(tokenizer)) for _ in range(80)]
        states = [DecodeState(), DecodeState()]
        cut = [0, 0]
        while cut[0] < len(ids) or cut[1] < len(ids):
            cut = [min(len(ids), c + rng.randint(1, 5)) for c in cut]
            before = [s.text for s in states]
            detok.update([(s, ids[:c]) for s, c in zip(states, cut)])   # two requests in one call
            for s, b in zip(states, before):
                assert s.text.startswith(b)                          # nothing emitted is taken back
        for s in states:
            assert s.full_text == tokenizer.decode(ids, skip_special_tokens=True), trial


def run(engine, requests):
    chunks: dict[str, list[TokenChunk]] = {}
    results: dict[str, GenerationResult] = {}
    for r in requests:
        engine.add(r)
    while engine.has_work:
        events, _ = engine.step()
        for e in events:
            if isinstance(e, TokenChunk):
                chunks.setdefault(e.request_id, []).append(e)
            else:
                results[e.request_id] = e
    return chunks, results


PROMPTS = ["Write a haiku about the sea.", "List three prime numbers.", "Say hello in French and in Japanese."]


def test_stop_strings_cut_at_their_first_occurrence_and_are_never_streamed(smollm_fp32):
    tokenizer = smollm_fp32.tokenizer
    engine = build_engine(EngineConfig(method="ar", max_batch=3, max_context=256), smollm_fp32)
    prompts = [chat_ids(tokenizer, p) for p in PROMPTS]
    first = [request(p, max_new_tokens=32, seed=i) for i, p in enumerate(prompts)]
    _, plain = run(engine, first)
    texts = []
    for r in (plain[r.request_id] for r in first):   # the final text is the whole decode of the ids
        assert r.text == tokenizer.decode(r.output_ids, skip_special_tokens=True)
        texts.append(r.text)
    reqs, want = [], []
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        k = len(text) // 2
        stops = (text[k:k + 3], text[k + 1:k + 6])       # two stops: the one found first wins
        plain_request = request(prompt, max_new_tokens=32, seed=i)
        reqs.append(replace(plain_request, sampling=replace(plain_request.sampling, stop=stops)))
        want.append((text[:min(text.find(s) for s in stops)], stops))
    chunks, results = run(engine, reqs)
    for r, (text, stops) in zip(reqs, want):
        result = results[r.request_id]
        assert result.finish_reason == "stop" and result.text == text
        streamed = "".join(c.text for c in chunks[r.request_id])
        assert streamed == text and not any(s in streamed for s in stops)


def test_a_stop_string_matches_no_character_that_a_later_token_completes(smollm_fp32):
    """Japanese takes two tokens a character here, so after the first the text ends in U+FFFD: a
    stop string "\ufffd" ended such a reply at its first token, with no text, though its text holds
    none. Cut off mid-character by its token limit, the U+FFFD is in the final text and is cut."""
    engine = build_engine(EngineConfig(method="ar", max_batch=1, max_context=256), smollm_fp32)
    prompt = tuple(chat_ids(smollm_fp32.tokenizer, "Say hello in Japanese."))

    def run_one(n, stop=()):
        return engine.generate(GenerationRequest("j", prompt, SamplingParams(max_new_tokens=n, stop=stop)))
    plain = run_one(8)
    assert "\ufffd" not in plain.text and len(plain.text) < len(plain.output_ids)
    stopped = run_one(8, ("\ufffd",))
    assert (stopped.output_ids, stopped.text, stopped.finish_reason) == (plain.output_ids, plain.text, "length")
    cut_short = run_one(7)
    assert cut_short.text.endswith("\ufffd")
    stopped = run_one(7, ("\ufffd",))
    assert stopped.text == cut_short.text[:-1] and stopped.finish_reason == "stop"
