"""Prompt lookup across requests (engine/drafters/corpus.py): a request whose own text holds no match
drafts what followed its suffix in another request's text of the same scope, never another scope's;
output stays plain decoding's; finished text is kept within a token capacity, oldest out first."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from engine.api import CorpusFill, DraftCounts
from engine.config import EngineConfig
from engine.drafters.corpus import CorpusIndex
from tests.drafters.helpers import request
from tests.drafters.test_lossless import drafter_dir, engine_for, run_batch


def test_a_match_in_another_document_of_the_scope_is_continued():
    corpus = CorpusIndex(capacity=100, min_n=2, max_n=3)
    corpus.extend("a", "s", [1, 2, 3, 4, 5, 6])
    assert corpus.lookup("s", [9, 2, 3], 3) == [4, 5, 6]
    assert corpus.lookup("s", [9, 4, 5], 3) == [6], "cut where the document's text ends"
    assert corpus.lookup("other", [9, 2, 3], 3) == [], "another scope sees nothing"
    assert corpus.lookup("s", [9, 9, 3], 3) == [], "shorter than min_n"
    assert corpus.lookup("s", [9, 5, 6], 3) == [], "a document's suffix is indexed only once a token follows it"


def test_the_longest_and_latest_match_wins():
    corpus = CorpusIndex(capacity=100, min_n=2, max_n=3)
    corpus.extend("a", "s", [1, 2, 3, 10, 11])
    corpus.extend("b", "s", [7, 2, 3, 20, 21])
    assert corpus.lookup("s", [0, 2, 3], 2) == [20, 21], "the latest occurrence of (2, 3)"
    assert corpus.lookup("s", [1, 2, 3], 2) == [10, 11], "(1, 2, 3) is longer"


def test_documents_are_indexed_as_they_grow():
    whole, grown = CorpusIndex(100, 2, 3), CorpusIndex(100, 2, 3)
    text = [4, 8, 15, 16, 23, 42, 4, 8, 15]
    whole.extend("a", "s", text)
    for end in range(1, len(text) + 1, 2):
        grown.extend("a", "s", text[:end])
    grown.extend("a", "s", text)
    assert grown.table == whole.table


def test_finished_text_is_kept_within_the_capacity_oldest_out_first():
    corpus = CorpusIndex(capacity=10, min_n=2, max_n=2)
    corpus.extend("old", "s", [1, 2, 3, 4, 5, 6])
    corpus.extend("running", "s", [1, 2, 7, 8, 9, 10, 11, 12])
    corpus.finish("old")
    assert corpus.lookup("s", [0, 3, 4], 2) == [5, 6]
    corpus.extend("new", "s", [3, 4, 30, 31, 32])
    corpus.finish("new")                      # 6 + 5 finished tokens > 10: "old" goes
    assert "old" not in corpus.docs and corpus.finished_tokens == 5
    assert corpus.lookup("s", [0, 1, 2], 2) == [7, 8], "a running request's text is never evicted"
    assert corpus.lookup("s", [0, 3, 4], 2) == [30, 31], "the newer occurrence stays"
    assert corpus.lookup("s", [0, 5, 6], 2) == [] and corpus.lookup("s", [0, 4, 5], 2) == []
    assert corpus.lookup("s", [0, 2, 3], 2) == []
    # 2-grams: 6 of "running" (its (1, 2) had replaced old's), 3 of "new" (its (3, 4) too)
    assert len(corpus.table) == 6 + 3, "only the evicted document's own entries left the table"


def test_a_request_id_used_again_starts_a_new_document():
    corpus = CorpusIndex(capacity=100, min_n=2, max_n=2)
    corpus.extend("r", "s", [1, 2, 3, 4])
    corpus.finish("r")
    corpus.extend("r", "s", [7, 8, 9])
    assert corpus.lookup("s", [0, 7, 8], 2) == [9] and corpus.lookup("s", [0, 2, 3], 2) == []
    corpus.finish("r")
    assert corpus.finished_tokens == 3


def test_the_fill_counts_running_and_kept_text():
    corpus = CorpusIndex(capacity=10, min_n=2, max_n=2)
    corpus.extend("old", "s", [1, 2, 3, 4, 5, 6])
    corpus.finish("old")
    corpus.extend("running", "s", [1, 2, 7])
    corpus.extend("running", "s", [1, 2, 7, 8, 9, 10, 11, 12])
    assert corpus.fill() == CorpusFill(tokens=6 + 8, documents=2, capacity=10)
    corpus.extend("new", "s", [3, 4, 30, 31, 32])
    corpus.finish("new")                      # "old" is evicted
    assert corpus.fill() == CorpusFill(tokens=8 + 5, documents=2, capacity=10)


def test_bad_corpus_settings_are_refused():
    with pytest.raises(ValueError, match="min_n <= max_n"):
        CorpusIndex(10, 3, 2)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        EngineConfig(method="dspark", lookup_min_match=2, lookup_corpus_tokens=-1)


PROMPT = [21, 22, 23, 24, 25, 26, 27]    # no 2-gram twice: its own text holds no match at first


def test_a_request_drafts_from_an_earlier_request_of_its_scope_losslessly(target, tmp_path_factory):
    """The second request repeats the first one's prompt. In the same scope the first one's reply is
    drafted for it from its first round on and accepted; without a scope, or in another, it is not.
    Every output is plain decoding's."""
    want = run_batch(engine_for(target, "ar"), [request(PROMPT, max_new_tokens=30)])[0].output_ids
    drafter = drafter_dir(target, tmp_path_factory, "dspark", "vanilla")
    for second_scope, shared in (("client-a", True), ("client-b", False), (None, False)):
        spec = engine_for(target, "dspark", drafter, lookup_min_match=2)
        first = dataclasses.replace(request(PROMPT, max_new_tokens=30), corpus_scope="client-a")
        second = dataclasses.replace(request(PROMPT, max_new_tokens=30), corpus_scope=second_scope)
        got = run_batch(spec, [first]) + run_batch(spec, [second])
        assert [r.output_ids for r in got] == [want, want]
        corpus_counts = spec.drafter.node["corpus"]
        if shared:
            assert corpus_counts.accepted[0] > 0 and got[1].stats.rounds < got[0].stats.rounds, (
                corpus_counts, got[0].stats.rounds, got[1].stats.rounds)
        else:
            assert corpus_counts.reached == [0] * len(corpus_counts.reached)
        assert spec.drafter.counts == {} and spec.drafter.pending == {}, "state released"


def test_the_corpus_is_off_at_capacity_zero(target, tmp_path_factory):
    spec = engine_for(target, "dspark", drafter_dir(target, tmp_path_factory, "dspark", "vanilla"),
                      lookup_min_match=2, lookup_corpus_tokens=0)
    assert spec.drafter.corpus is None
    for _ in range(2):
        run_batch(spec, [dataclasses.replace(request(PROMPT, max_new_tokens=12), corpus_scope="s")])
    assert spec.drafter.node["corpus"].reached[0] == 0


def test_drafts_are_counted_by_source(target, tmp_path_factory):
    """A request repeating an earlier one's prompt in its scope drafts from the corpus and has those
    drafts accepted; a request of another scope drafts nothing from it. Each request's counts by
    source add up to its totals, and the corpus reports the text it holds."""
    spec = engine_for(target, "dspark", drafter_dir(target, tmp_path_factory, "dspark", "vanilla"),
                      lookup_min_match=2, lookup_corpus_tokens=1000)
    first, same, other = (dataclasses.replace(request(PROMPT, max_new_tokens=30), corpus_scope=scope)
                          for scope in ("client-a", "client-a", "client-b"))
    got = run_batch(spec, [first]) + run_batch(spec, [same]) + run_batch(spec, [other])
    corpus = [r.stats.by_source.get("corpus", DraftCounts()) for r in got]
    assert corpus[1].drafted > 0 and corpus[1].accepted > 0, got[1].stats.by_source
    assert corpus[0].drafted == corpus[2].drafted == 0, (got[0].stats.by_source, got[2].stats.by_source)
    assert got[0].stats.by_source["drafter"].drafted > 0, "the model drafts where no lookup matches"
    for r in got:
        s, counts = r.stats, r.stats.by_source.values()
        assert set(s.by_source) <= {"own", "corpus", "drafter"}
        assert (sum(c.drafted for c in counts), sum(c.verified for c in counts), sum(c.accepted for c in counts)) \
            == (s.drafted_tokens, s.verified_tokens, s.accepted_tokens)
    held = sum(len(PROMPT) + len(r.output_ids) for r in got)
    assert spec.drafter.corpus_fill() == CorpusFill(tokens=held, documents=3, capacity=1000)


def test_without_a_lookup_every_draft_is_the_drafters_and_there_is_no_corpus(target, tmp_path_factory):
    spec = engine_for(target, "dspark", drafter_dir(target, tmp_path_factory, "dspark", "vanilla"))
    (result,) = run_batch(spec, [dataclasses.replace(request(PROMPT, max_new_tokens=12), corpus_scope="s")])
    assert set(result.stats.by_source) == {"drafter"} and spec.drafter.corpus_fill() is None
    assert result.stats.by_source["drafter"].drafted == result.stats.drafted_tokens > 0
