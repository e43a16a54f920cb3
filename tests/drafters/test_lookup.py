"""Prompt lookup ahead of a model drafter (engine/drafters/lookup.py): output stays the target's
(fp32 greedy token for token, the sampling distribution by chi-square), lookup drafts are made and
accepted where the request repeats itself, and their confidences are the counted acceptance."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from engine.config import EngineConfig
from engine.loading import load_target
from engine.testing import make_tiny_model
from engine.drafters.lookup import PRIOR_ROUNDS, AcceptanceCounts
from engine.drafters.ngram import NgramIndex
from engine.prefix_scheduler import PrefixScheduler
from tests.drafters.helpers import request
from tests.drafters.test_lossless import (PROMPTS, assert_follows, draw_pairs, drafter_dir, engine_for,
                                          exact_pair_distribution, run_batch, run_with_reports)


LOOPING_PROMPTS = [[5, 9, 5, 9, 7], [11, 12, 13, 300, 11]]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def looping_target(request, tmp_path_factory):
    """A random model with a tied LM head: it mostly repeats its input token, so its text loops and
    a lookup hits from the first rounds on."""
    path = make_tiny_model(tmp_path_factory.mktemp(f"looping-{request.param}"), layers=4, family=request.param,
                           seed=3)
    return load_target(str(path), torch.float32)


def repeating_prompts(target) -> list[list[int]]:
    """The first prompt followed by the start of the target's own reply and the prompt's last token
    again, so that a lookup proposes the rest of that reply (the target departs from it after a few
    tokens or at once: the accepting path is the looping target's test), and the second prompt as it is."""
    first = run_batch(engine_for(target, "ar"), [request(PROMPTS[0], max_new_tokens=12)])[0].output_ids
    return [PROMPTS[0] + list(first) + PROMPTS[0][-1:], PROMPTS[1]]


@pytest.mark.parametrize("kind,markov_type,scheduler", [("dspark", "vanilla", "static"),
                                                        ("dspark", "vanilla", "sync"),
                                                        ("eagle3", None, "static")])
def test_greedy_matches_plain_decoding_with_lookup_and_model_drafts(target, tmp_path_factory, kind, markov_type,
                                                                    scheduler):
    prompts = repeating_prompts(target)
    want = [r.output_ids for r in run_batch(engine_for(target, "ar"), [request(p, max_new_tokens=30) for p in prompts])]
    spec = engine_for(target, kind, drafter_dir(target, tmp_path_factory, kind, markov_type), scheduler=scheduler,
                      lookup_min_match=1)
    if scheduler == "sync":
        spec.schedule = PrefixScheduler(lambda rows, width: 1 / (1 + 0.01 * (width - 1)), mode="sync")
    lookup, model_rows = spec.drafter, []
    propose = lookup.model.propose
    lookup.model.propose = lambda seqs, horizon=None: model_rows.append(len(seqs)) or propose(seqs, horizon)
    got = run_batch(spec, [request(p, max_new_tokens=30) for p in prompts])
    assert [r.output_ids for r in got] == want
    node = lookup.node["own"]
    assert node.reached[0] > 0 and sum(node.reached) > sum(node.accepted), "lookup drafts verified, some rejected"
    assert sum(model_rows) > 0, "the model drafted where no lookup matched"
    assert lookup.indexes == {} and lookup.counts == {} and lookup.pending == {}, "state released"


def test_a_loop_is_drafted_by_lookup_to_the_full_block(looping_target, tmp_path_factory):
    target = looping_target
    want = [r.output_ids for r in run_batch(engine_for(target, "ar"),
                                            [request(p, max_new_tokens=30) for p in LOOPING_PROMPTS])]
    spec = engine_for(target, "dspark", drafter_dir(target, tmp_path_factory, "dspark", "vanilla"),
                      lookup_min_match=2)
    got = run_batch(spec, [request(p, max_new_tokens=30) for p in LOOPING_PROMPTS])
    assert [r.output_ids for r in got] == want
    assert all(a > 0 for a in spec.drafter.node["own"].accepted), "whole blocks of the loop were accepted"
    assert all(r.stats.by_source["own"].accepted > 0 for r in got), [r.stats.by_source for r in got]
    assert sum(r.stats.rounds for r in got) < 30


def test_the_ngram_method_drafts_from_the_request_own_text(looping_target):
    got = run_batch(engine_for(looping_target, "ngram"), [request(p, max_new_tokens=30) for p in LOOPING_PROMPTS])
    assert all(set(r.stats.by_source) == {"own"} and r.stats.by_source["own"].accepted > 0 for r in got)


def test_lookup_drafts_are_made_while_the_backoff_pauses_the_request(looping_target, tmp_path_factory):
    """A profile where a step W tokens wide is W times slower: no draft is worth verifying and the backoff
    pauses drafting, but a lookup hit, which costs no forward, is still proposed."""
    target, prompts = looping_target, LOOPING_PROMPTS
    want = [r.output_ids for r in run_batch(engine_for(target, "ar"), [request(p, max_new_tokens=24) for p in prompts])]
    drafter = drafter_dir(target, tmp_path_factory, "dspark", "vanilla")
    drafted = {}
    for lookup in (0, 2):
        spec = engine_for(target, "dspark", drafter, scheduler="sync", lookup_min_match=lookup)
        spec.schedule = PrefixScheduler(lambda rows, width: 1.0 / width, mode="sync")
        got, reports = run_with_reports(spec, [request(p, max_new_tokens=24) for p in prompts])
        assert [r.output_ids for r in got] == want
        assert all(sum(report.budgets) == 0 for report in reports)
        drafted[lookup] = sum(report.drafted for report in reports)
    rounds = sum(r.stats.rounds for r in got)
    assert drafted[0] < rounds // 2 < drafted[2], (drafted, rounds)


def test_acceptance_counts_and_confidence():
    counts = AcceptanceCounts.empty(4)
    counts.add(verified=3, accepted=1)   # 1 accepted, 2 rejected, 3 never reached
    counts.add(verified=2, accepted=2)   # both accepted, 3 not verified
    counts.add(verified=0, accepted=0)
    assert counts.reached == [2, 2, 0, 0] and counts.accepted == [2, 1, 0, 0]
    assert counts.rate(0) == 3 / 4 and counts.rate(2) == 1 / 2


def test_confidence_moves_from_the_node_rate_to_the_request_own(target, tmp_path_factory):
    spec = engine_for(target, "dspark", drafter_dir(target, tmp_path_factory, "dspark", "vanilla"),
                      lookup_min_match=2)
    lookup = spec.drafter
    lookup.node["own"] = AcceptanceCounts([98, 0, 0, 0, 0], [98, 0, 0, 0, 0])    # the node: position 1 98/98
    lookup.counts["r", "own"] = AcceptanceCounts([6, 0, 0, 0, 0], [0, 0, 0, 0, 0])  # this request: 0/6
    lookup.counts["r", "corpus"] = AcceptanceCounts.empty(5)
    c = lookup.confidence("r", "own", 2)
    assert c.dtype == torch.float32
    assert c[0] == pytest.approx(PRIOR_ROUNDS * 0.99 / (6 + PRIOR_ROUNDS))
    assert c[1] == pytest.approx(0.5)  # nothing counted anywhere: the Laplace prior
    assert lookup.confidence("r", "corpus", 1)[0] == pytest.approx(0.5), "each source counts apart"


def test_sampling_distribution_matches_target_with_lookup_and_model_drafts(target, tmp_path_factory):
    """The second token is drafted by lookup when the first is one the prompt holds, by the model
    otherwise: the pair still follows the target's joint distribution."""
    if target.model.args.family != "qwen3":
        pytest.skip("one family is enough for the distribution test (the greedy tests cover both)")
    temperature, top_p, draws = 0.9, 0.9, 400
    likely = sorted(exact_pair_distribution(target, PROMPTS[1], temperature, top_p).items(), key=lambda kv: -kv[1])
    prompt = [likely[0][0][0], 55] + PROMPTS[1]   # holds the likeliest first token, followed by another
    exact = exact_pair_distribution(target, prompt, temperature, top_p)
    engine = engine_for(target, "dspark", drafter_dir(target, tmp_path_factory, "dspark", "gated", block_size=2),
                        lookup_min_match=1)
    counts, _ = draw_pairs(engine, prompt, exact, temperature, top_p, draws)
    lookups = engine.drafter.node["own"].reached[0]
    assert draws // 20 < lookups < draws - draws // 20, f"{lookups} of {draws} second tokens looked up"
    assert_follows(exact, counts, draws)


@pytest.mark.parametrize("fields,message", [
    ({"method": "ar", "lookup_min_match": 2}, "has none"),
    ({"method": "ngram", "lookup_min_match": 2}, "has none"),
    ({"method": "dspark", "lookup_min_match": 4}, "cannot exceed ngram_max"),
    ({"method": "dspark", "lookup_min_match": -1}, "greater than or equal to 0"),
])
def test_bad_lookup_settings_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        EngineConfig(**fields)


def test_the_index_continues_a_recent_match_as_an_overlapping_copy():
    index = NgramIndex(3)
    tokens = [1, 2, 3, 4, 2, 3, 4, 2, 3]
    index.update(tokens)
    assert index.lookup(tokens, 5, 1) == [4, 2, 3, 4, 2]    # (2, 3) last seen 3 back: period 3
    assert index.lookup(tokens, 5, 3) == [4, 2, 3, 4, 2]    # (4, 2, 3) likewise
    assert index.lookup([7, 7, 7], 3, 1) == []               # not indexed yet: no match with itself
    index.update(tokens + [9, 1, 2])
    assert index.lookup(tokens + [9, 1, 2], 4, 2) == [3, 4, 2, 3]   # a match far back is copied as it was
    assert index.lookup(tokens + [9, 1, 2], 4, 3) == []
