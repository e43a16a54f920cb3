"""Prompt lookup across requests: an n-gram index over the prompts and outputs of the requests a
node has served, so that a request whose own text holds no match can continue one found in another
request's text (the global suffix tree of SuffixDecoding, Oliaro et al., 2024, as an n-gram table).

A node's traffic repeats itself across requests far more than within one: the same boilerplate
around code, the same phrasing of worked answers. Replayed on the target's own greedy outputs to
24 prompts per benchmark set, interleaved (docs/benchmarks.md, "Prompt lookup across requests"),
lookup alone commits 1.91 / 1.36 / 1.86 / 1.71 tokens a round on HumanEval / MBPP / GSM8K / MT-Bench
from each request's own text, 2.30 / 1.84 / 2.27 / 1.77 with the others' text too.

Requests share only within a scope (the node uses the client's key): a drafted request runs faster
when its text continues another's, and that timing must not tell one client what another asked or
was told (the side channel of shared prefix caches, which vLLM closes with a per-tenant salt).

Lossless as the request's own lookup is: the draft is a function of text committed before the round,
deterministic (q one-hot), and verified by the target.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.api import CorpusFill


@dataclass
class _Document:
    doc_id: str
    number: int                  # the document's serial, packed into table values
    scope: str
    tokens: list[int] = field(default_factory=list)
    running: bool = True         # its request is still decoding (never evicted then)


class CorpusIndex:
    """(scope, n-gram) -> the position right after its latest occurrence in any document of that
    scope, for n in [min_n, max_n]. Documents are indexed as their requests commit tokens; finished
    ones are kept, oldest evicted first, while they hold more than `capacity` tokens in all.

    Keys are hashes of (scope, n-gram) and values pack (document, position) into one int, so that
    the index costs ~75 bytes a token (the target's replies to the benchmark prompts at n = 2..3,
    measured with tracemalloc). A hash collision can only give a wrong draft, which verification
    rejects."""

    def __init__(self, capacity: int, min_n: int, max_n: int):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"corpus n-grams need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.capacity, self.min_n, self.max_n = capacity, min_n, max_n
        self.table: dict[int, int] = {}
        self.docs: dict[str, _Document] = {}   # oldest first (insertion order)
        self.by_number: dict[int, _Document] = {}
        self.finished_tokens = 0
        self.held_tokens = 0                   # all documents', running ones too
        self._serial = 0

    def extend(self, doc_id: str, scope: str, tokens: list[int]) -> None:
        """Index `tokens` (the document's whole text so far; earlier tokens must not change)."""
        doc = self.docs.get(doc_id)
        if doc is not None and not doc.running:   # an id used again after its request finished: a new text
            self._evict(doc)
            doc = None
        if doc is None:
            doc = self.docs[doc_id] = self.by_number[self._serial] = _Document(doc_id, self._serial, scope)
            self._serial += 1
        known = len(doc.tokens)
        doc.tokens.extend(tokens[known:])
        self.held_tokens += len(doc.tokens) - known
        for key, value in self._entries(doc, known):
            self.table[key] = value

    def finish(self, doc_id: str) -> None:
        """The document's request left: keep its text for others, within the capacity."""
        doc = self.docs.get(doc_id)
        if doc is None or not doc.running:
            return
        doc.running = False
        self.finished_tokens += len(doc.tokens)
        while self.finished_tokens > self.capacity:
            oldest = next((d for d in self.docs.values() if not d.running), None)
            if oldest is None:
                break
            self._evict(oldest)

    def lookup(self, scope: str, tokens: list[int], length: int) -> list[int]:
        """What followed the latest occurrence, in the scope, of the longest suffix of n >= min_n
        tokens: up to `length` tokens, fewer where that document's text ends."""
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            value = self.table.get(self._key(scope, tokens[-n:]))
            if value is None:
                continue
            doc, t = self.by_number.get(value >> 32), value & 0xFFFFFFFF
            if doc is not None and doc.scope == scope and doc.tokens[t - n:t] == tokens[-n:]:
                return doc.tokens[t:t + length]
        return []

    def fill(self) -> CorpusFill:
        """Read by the node's threads while the engine thread indexes: plain reads of an int and a
        dict's length, each atomic under the GIL, so no lock; they may straddle one update."""
        return CorpusFill(tokens=self.held_tokens, documents=len(self.docs), capacity=self.capacity)

    def _entries(self, doc: _Document, start: int) -> Iterator[tuple[int, int]]:
        """The table entries of `doc`'s n-grams that end before positions start.. . The n-gram ending
        before position t is recorded once token t exists, so that a document's current suffix never
        matches itself (as in NgramIndex)."""
        for t in range(max(start, 1), len(doc.tokens)):
            for n in range(self.min_n, min(self.max_n, t) + 1):
                yield self._key(doc.scope, doc.tokens[t - n:t]), (doc.number << 32) | t

    def _evict(self, doc: _Document) -> None:
        for key, value in self._entries(doc, 0):
            if self.table.get(key) == value:    # not since taken over by a later occurrence
                del self.table[key]
        self.finished_tokens -= len(doc.tokens)
        self.held_tokens -= len(doc.tokens)
        del self.docs[doc.doc_id]
        del self.by_number[doc.number]

    @staticmethod
    def _key(scope: str, ngram: list[int]) -> int:
        return hash((scope, *ngram))
