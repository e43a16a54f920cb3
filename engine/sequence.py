"""Per-request state inside the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.api import FinishReason, GenerationRequest, RequestStats
from engine.detokenize import DecodeState


@dataclass
class Sequence:
    request: GenerationRequest
    generator: torch.Generator
    tokens: list[int]                      # prompt + committed output; the last one is the anchor
    prompt_len: int
    slot: int = -1                         # row of the KV cache while active
    kv_len: int = 0                        # positions 0..kv_len-1 hold valid K/V
    prompt_taps: list[torch.Tensor] = field(default_factory=list)   # drafter features of cached prompt chunks
    stats: RequestStats = field(default_factory=RequestStats)
    finish_reason: FinishReason | None = None
    drafter_state: object = None
    decoded: DecodeState = field(default_factory=DecodeState)   # the output ids' text, incrementally
    stop_searched: int = 0                 # decoded.text before this held no stop string
    text: str = ""                         # decoded output so far (stop strings cut it)
    sent_text_len: int = 0                 # how much of `text` was streamed
    sent_tokens: int = 0
    # the last round's (draft source, drafts verified, drafts accepted, confidence recorded), for
    # `spec_round.uncount_dropped` when a stop string cuts that round's tokens short
    last_round: tuple[str, int, int, bool] | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def remaining(self) -> int:
        return self.request.sampling.max_new_tokens - len(self.output_ids)
