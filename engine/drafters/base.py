"""The drafter interface: what the speculative round asks of any drafter.

A drafter proposes up to `block_size` tokens per request, with the distribution each was sampled
from (None when proposals are deterministic) and, for DSpark, a per-position conditional confidence.
It may read the target's hidden states at `tap_layers` for the committed tokens (reference §1.1),
which the engine hands over at `start` (prompt) and `commit` (each round's verified prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from engine.api import CorpusFill
from engine.sequence import Sequence


@dataclass
class Proposal:
    tokens: list[list[int]]                          # per request, 0..block_size tokens
    probs: list[torch.Tensor | None]                 # per request [len, V] or None (deterministic)
    confidence: list[torch.Tensor | None] = field(default_factory=list)  # per request [len], c_k in (0, 1)
    # per request [len, 2]: the confidence head's inputs (z_k, u_k) before calibration, recorded for it
    confidence_inputs: list[torch.Tensor | None] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)   # per request, one of engine.api.DRAFT_SOURCES

    def __post_init__(self) -> None:
        # A drafter without a confidence head leaves them out: one None per request, so every reader
        # indexes them like `tokens`. Only lookup drafters name a source other than the model.
        self.confidence = self.confidence or [None] * len(self.tokens)
        self.confidence_inputs = self.confidence_inputs or [None] * len(self.tokens)
        self.sources = self.sources or ["drafter"] * len(self.tokens)


class Horizon(Protocol):
    """How far this round's drafts can still be verified (engine/prefix_scheduler.py,
    `AdmissionHorizon`), so that a drafter that drafts slot by slot stops where nothing further
    would be verified."""

    def fix(self, seq: Sequence, confidence: torch.Tensor) -> None:
        """A row whose whole proposal is known before the others are drafted (a lookup draft)."""

    def more(self, seqs: list[Sequence], slot: int, confidence: torch.Tensor) -> bool:
        """After drafting slot `slot` (1 = the first) for `seqs`, with conditional confidences
        [len(seqs)]: whether a draft at slot + 1 could still be verified this round."""


class Drafter:
    """Plain autoregressive decoding: proposes nothing, so each round verifies only the anchor."""

    name = "ar"
    block_size = 0
    tap_layers: tuple[int, ...] = ()
    digest = b""

    def start(self, seq: Sequence, prompt_features: torch.Tensor | None) -> None:
        """Called after prefill; features: [prompt_len, m*H] of the tapped layers, or None."""

    def propose(self, seqs: list[Sequence], horizon: Horizon | None = None) -> Proposal:
        """A drafter that drafts slot by slot and has confidences may stop where `horizon` says
        nothing further would be verified; any other drafter ignores it."""
        return Proposal(tokens=[[] for _ in seqs], probs=[None] * len(seqs))

    def free_draft(self, seq: Sequence) -> bool:
        """Whether a proposal for `seq` this round costs no forward (a prompt-lookup hit), so that it
        is made even while the draft backoff pauses the request."""
        return False

    def commit(self, seq: Sequence, features: torch.Tensor | None, verified: int, accepted: int) -> None:
        """Called after verification: `verified` of the proposed tokens were verified, `accepted` of
        those accepted; features of the newly cached positions [accepted+1, m*H]."""

    def release(self, seq: Sequence) -> None:
        """The request left the batch."""

    def corpus_fill(self) -> CorpusFill | None:
        """The cross-request lookup corpus's size, for a drafter that keeps one. Read by the node's
        threads while the engine thread drafts, so it must not take a lock the engine holds."""
        return None
