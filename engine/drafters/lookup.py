"""Prompt lookup ahead of a model drafter: where a request's last n >= `min_match` tokens occurred
before in its prompt or output, propose what followed them there; elsewhere the model drafter
(DSpark, DFlash or EAGLE-3) proposes.

A deviation from DSpark, which drafts every block with its model (reference §4.3). A drafter
small enough to train on a CPU continues text the request already holds (a restated signature, a
quoted name, a loop of a small target) worse than a lookup does: on the first HumanEval prompts at
T=0 prompt lookup commits 3.3 tokens a round against DSpark's 1.3-1.5 (docs/benchmarks.md).
SuffixDecoding (Oliaro et al., 2024) pairs a suffix match with a model drafter the same way.

Lossless: whether a request's draft comes from the lookup depends only on its committed tokens,
never on a sampled draft, and a lookup draft is deterministic (q one-hot), so the verification rule
stays exact (reference §4.3 step 4). A lookup costs no forward, so it is tried even for a request
the draft backoff has paused (`free_draft`).

Where the request's own text holds no match, the text of other requests of its scope may
(engine/drafters/corpus.py), before the model is asked.

Confidences, which the scheduler ranks drafts by (paper Algorithm 1), come for a lookup draft from
acceptance counts per draft position and per source (the request's own text, or the corpus: a match
in another request's text is accepted far less often): the request's own lookup drafts from that
source so far, starting from the node's (PRIOR_ROUNDS pseudo-rounds of it). The model's drafts keep
their calibrated head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.api import CorpusFill
from engine.calibration import tally_positions
from engine.drafters.base import Drafter, Horizon, Proposal
from engine.drafters.corpus import CorpusIndex
from engine.drafters.ngram import NgramIndex
from engine.sequence import Sequence

PRIOR_ROUNDS = 4.0   # weight of the node-wide acceptance in a request's estimate, in rounds
SOURCES = ("own", "corpus")   # where a lookup draft was found: the request's own text, other requests'


@dataclass
class AcceptanceCounts:
    """Per draft position k: lookup rounds that verified k with every earlier draft accepted, and
    those of them that accepted k too."""
    reached: list[int]
    accepted: list[int]

    @classmethod
    def empty(cls, block: int) -> AcceptanceCounts:
        return cls([0] * block, [0] * block)

    def add(self, verified: int, accepted: int) -> None:
        tally_positions(self.reached, self.accepted, verified, accepted)

    def rate(self, k: int) -> float:
        """Laplace-smoothed conditional acceptance at position k."""
        return (self.accepted[k] + 1) / (self.reached[k] + 2)


class LookupFirst(Drafter):
    def __init__(self, model: Drafter, max_n: int, min_match: int, corpus: CorpusIndex | None = None):
        self.model = model
        self.name, self.block_size = f"{model.name}+lookup", model.block_size
        self.tap_layers, self.digest = model.tap_layers, model.digest
        self.max_n, self.min_match = max_n, min_match
        self.corpus = corpus
        self.indexes: dict[str, NgramIndex] = {}
        self.counts: dict[tuple[str, str], AcceptanceCounts] = {}     # (request, source) -> its lookups
        self.node = {source: AcceptanceCounts.empty(self.block_size) for source in SOURCES}
        self.found: dict[str, tuple[list[int], str]] = {}  # this round's lookup draft and its source, per request
        self.pending: dict[str, str] = {}          # request -> source, where this round's proposal was a lookup

    def start(self, seq: Sequence, prompt_features: torch.Tensor | None) -> None:
        self.model.start(seq, prompt_features)
        self.indexes[seq.request_id] = NgramIndex(self.max_n)
        for source in SOURCES:
            self.counts[seq.request_id, source] = AcceptanceCounts.empty(self.block_size)

    def free_draft(self, seq: Sequence) -> bool:
        return bool(self._lookup(seq)[0])

    def _lookup(self, seq: Sequence) -> tuple[list[int], str]:
        index = self.indexes[seq.request_id]
        if index.indexed != len(seq.tokens):
            index.update(seq.tokens)
            draft, source = index.lookup(seq.tokens, self.block_size, self.min_match), "own"
            scope = seq.request.corpus_scope
            if self.corpus is not None and scope is not None:
                self.corpus.extend(seq.request_id, scope, seq.tokens)
                if not draft:
                    draft, source = self.corpus.lookup(scope, seq.tokens, self.block_size), "corpus"
            self.found[seq.request_id] = (draft, source)
        return self.found[seq.request_id]

    def confidence(self, request_id: str, source: str, length: int) -> torch.Tensor:
        own, node = self.counts[request_id, source], self.node[source]
        return torch.tensor([(own.accepted[k] + PRIOR_ROUNDS * node.rate(k)) / (own.reached[k] + PRIOR_ROUNDS)
                             for k in range(length)], dtype=torch.float32)

    def propose(self, seqs: list[Sequence], horizon: Horizon | None = None) -> Proposal:
        found = [self._lookup(seq) for seq in seqs]
        if horizon is not None:
            for seq, (draft, source) in zip(seqs, found):
                if draft:
                    horizon.fix(seq, self.confidence(seq.request_id, source, len(draft)))
        rest = [seq for seq, (draft, _) in zip(seqs, found) if not draft]
        model = self.model.propose(rest, horizon) if rest else Proposal(tokens=[], probs=[])
        model_rows = zip(model.tokens, model.probs, model.confidence, model.confidence_inputs, model.sources)
        tokens, probs, confidence, inputs, sources = [], [], [], [], []
        for seq, (draft, source) in zip(seqs, found):
            if draft:
                self.pending[seq.request_id] = source
                row = (draft, None, self.confidence(seq.request_id, source, len(draft)), None, source)
            else:
                self.pending.pop(seq.request_id, None)
                row = next(model_rows)
            for column, value in zip((tokens, probs, confidence, inputs, sources), row):
                column.append(value)
        return Proposal(tokens=tokens, probs=probs, confidence=confidence, confidence_inputs=inputs, sources=sources)

    def commit(self, seq: Sequence, features: torch.Tensor | None, verified: int, accepted: int) -> None:
        self.model.commit(seq, features, verified, accepted)
        source = self.pending.pop(seq.request_id, None)
        if source is not None:
            self.counts[seq.request_id, source].add(verified, accepted)
            self.node[source].add(verified, accepted)

    def corpus_fill(self) -> CorpusFill | None:
        return None if self.corpus is None else self.corpus.fill()

    def release(self, seq: Sequence) -> None:
        self.model.release(seq)
        if self.corpus is not None and seq.request.corpus_scope is not None:
            self.corpus.extend(seq.request_id, seq.request.corpus_scope, seq.tokens)   # its last round's tokens
            self.corpus.finish(seq.request_id)
        for table in (self.indexes, self.found, self.pending):
            table.pop(seq.request_id, None)
        for source in SOURCES:
            self.counts.pop((seq.request_id, source), None)
