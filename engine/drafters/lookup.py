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

Confidences, which the scheduler ranks drafts by (paper Algorithm 1), come for a lookup draft from
acceptance counts per draft position: the request's own lookup drafts so far, starting from the
node's (PRIOR_ROUNDS pseudo-rounds of it). The model's drafts keep their calibrated head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.calibration import tally_positions
from engine.drafters.base import Drafter, Horizon, Proposal
from engine.drafters.ngram import NgramIndex
from engine.sequence import Sequence

PRIOR_ROUNDS = 4.0   # weight of the node-wide acceptance in a request's estimate, in rounds


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
    def __init__(self, model: Drafter, max_n: int, min_match: int):
        self.model = model
        self.name, self.block_size = f"{model.name}+lookup", model.block_size
        self.tap_layers, self.digest = model.tap_layers, model.digest
        self.max_n, self.min_match = max_n, min_match
        self.indexes: dict[str, NgramIndex] = {}
        self.counts: dict[str, AcceptanceCounts] = {}
        self.node = AcceptanceCounts.empty(self.block_size)
        self.found: dict[str, list[int]] = {}      # this round's lookup draft, per request that has one
        self.pending: set[str] = set()             # requests whose proposal this round was a lookup

    def start(self, seq: Sequence, prompt_features: torch.Tensor | None) -> None:
        self.model.start(seq, prompt_features)
        self.indexes[seq.request_id] = NgramIndex(self.max_n)
        self.counts[seq.request_id] = AcceptanceCounts.empty(self.block_size)

    def free_draft(self, seq: Sequence) -> bool:
        return bool(self._lookup(seq))

    def _lookup(self, seq: Sequence) -> list[int]:
        index = self.indexes[seq.request_id]
        if index.indexed != len(seq.tokens):
            index.update(seq.tokens)
            self.found[seq.request_id] = index.lookup(seq.tokens, self.block_size, self.min_match)
        return self.found[seq.request_id]

    def confidence(self, request_id: str, length: int) -> torch.Tensor:
        own = self.counts[request_id]
        return torch.tensor([(own.accepted[k] + PRIOR_ROUNDS * self.node.rate(k)) / (own.reached[k] + PRIOR_ROUNDS)
                             for k in range(length)], dtype=torch.float32)

    def propose(self, seqs: list[Sequence], horizon: Horizon | None = None) -> Proposal:
        drafts = [self._lookup(seq) for seq in seqs]
        if horizon is not None:
            for seq, draft in zip(seqs, drafts):
                if draft:
                    horizon.fix(seq, self.confidence(seq.request_id, len(draft)))
        rest = [seq for seq, draft in zip(seqs, drafts) if not draft]
        model = self.model.propose(rest, horizon) if rest else Proposal(tokens=[], probs=[])
        model_rows = zip(model.tokens, model.probs, model.confidence, model.confidence_inputs)
        tokens, probs, confidence, inputs = [], [], [], []
        for seq, draft in zip(seqs, drafts):
            if draft:
                self.pending.add(seq.request_id)
                row = (draft, None, self.confidence(seq.request_id, len(draft)), None)
            else:
                self.pending.discard(seq.request_id)
                row = next(model_rows)
            for column, value in zip((tokens, probs, confidence, inputs), row):
                column.append(value)
        return Proposal(tokens=tokens, probs=probs, confidence=confidence, confidence_inputs=inputs)

    def commit(self, seq: Sequence, features: torch.Tensor | None, verified: int, accepted: int) -> None:
        self.model.commit(seq, features, verified, accepted)
        if seq.request_id in self.pending:
            self.pending.discard(seq.request_id)
            self.counts[seq.request_id].add(verified, accepted)
            self.node.add(verified, accepted)

    def release(self, seq: Sequence) -> None:
        self.model.release(seq)
        for table in (self.indexes, self.counts, self.found):
            table.pop(seq.request_id, None)
        self.pending.discard(seq.request_id)
