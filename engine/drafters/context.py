"""Target features of committed positions that a drafter has not yet written into its own cache.

DSpark, DFlash and EAGLE-3 read the target's tapped hidden states of every committed position
(reference §1.1): the engine hands them over after each round, the drafter ingests them at its next
proposal. Under the draft backoff a request may go up to 64 rounds without a proposal, so the
backlog is kept as a list and concatenated once, when taken: concatenating on every commit copied
the whole backlog every round (~0.5 ms a round at 16 requests on the 2-core box, measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PendingContext:
    chunks: list[torch.Tensor] = field(default_factory=list)   # each [n_i, m*H], in position order
    cached: int = 0     # the draft cache holds context positions 0..cached-1

    def add(self, features: torch.Tensor | None) -> None:
        if features is not None and len(features):
            self.chunks.append(features)

    def __len__(self) -> int:
        return sum(len(c) for c in self.chunks)

    def take(self, kv_len: int) -> tuple[torch.Tensor | None, int]:
        """The backlog [n, m*H] (None when empty) and its first position; afterwards the draft cache
        is taken to hold every position before `kv_len`."""
        chunks, start = self.chunks, self.cached
        self.chunks, self.cached = [], kv_len
        if not chunks:
            return None, start
        return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)), start
