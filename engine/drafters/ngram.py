"""Prompt-lookup drafting (Saxena 2023): propose the tokens that followed the latest earlier
occurrence of the sequence's last n tokens, trying the longest n first. Deterministic, so q is
one-hot and the verification rule stays exact."""

from __future__ import annotations

from engine.drafters.base import Drafter, Horizon, Proposal
from engine.sequence import Sequence


class NgramIndex:
    """n-gram -> the position right after its latest occurrence, updated as tokens are committed.

    The sequence's current suffix is indexed only once a token follows it, so a lookup never
    matches the suffix with itself.
    """

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.table: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # tokens[:indexed] have had their preceding n-grams recorded

    def update(self, tokens: list[int]) -> None:
        for t in range(max(self.indexed, 1), len(tokens)):
            for n in range(1, min(self.max_n, t) + 1):
                self.table[tuple(tokens[t - n:t])] = t
        self.indexed = len(tokens)

    def lookup(self, tokens: list[int], length: int, min_n: int) -> list[int]:
        """What followed the latest earlier occurrence of the longest suffix of n >= min_n tokens.

        A match that ends fewer than `length` tokens back is continued as an overlapping copy (as in
        LZ77): the text since the match is taken to repeat, so a loop of period p is drafted to the
        full length instead of p tokens (in a loop the latest occurrence is one period back)."""
        for n in range(min(self.max_n, len(tokens)), min_n - 1, -1):
            start = self.table.get(tuple(tokens[-n:]))
            if start is not None:
                period = len(tokens) - start
                return [tokens[start + i % period] for i in range(length)]
        return []


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, block_size: int, max_n: int):
        self.block_size = block_size
        self.max_n = max_n

    def start(self, seq: Sequence, prompt_features) -> None:
        seq.drafter_state = NgramIndex(self.max_n)

    def propose(self, seqs: list[Sequence], horizon: Horizon | None = None) -> Proposal:
        tokens = []
        for seq in seqs:
            index: NgramIndex = seq.drafter_state
            index.update(seq.tokens)
            tokens.append(index.lookup(seq.tokens, self.block_size, 1))
        return Proposal(tokens=tokens, probs=[None] * len(seqs), sources=["own"] * len(seqs))
