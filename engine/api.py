"""The engine's contract with the node (design doc, "Engine contract").

The node submits a `GenerationRequest` (token ids + sampling + limits) and receives, from
`AsyncEngine.generate`, `TokenChunk`s as tokens are committed and then one `GenerationResult`.
Nothing here knows about gRPC, peers or money.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]
# Where a draft came from: prompt lookup in the request's own text, lookup in other requests' text of
# its scope (engine/drafters/corpus.py), or the model drafter (DSpark, DFlash, EAGLE-3).
DRAFT_SOURCES = ("own", "corpus", "drafter")
# Sampling limits a request must keep (SamplingParams.validate); clients check them before they sign.
SEED_LIMIT = 2**63            # seeds are 0 .. SEED_LIMIT - 1
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256


class EngineFailed(RuntimeError):
    """What a request ends with when the engine can serve nothing more: its thread died, or a round
    stalled. The engine logs the cause once; the message repeats it."""


class RequestRejected(ValueError):
    """The engine cannot serve this request (too long, bad sampling values...); message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self, max_new_tokens_limit: int) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0 or self.temperature > 100:
            raise RequestRejected("bad_sampling", f"temperature must be in [0, 100], got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestRejected("bad_sampling", f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise RequestRejected("bad_sampling", f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_new_tokens > max_new_tokens_limit:
            raise RequestRejected(
                "too_long", f"max_new_tokens {self.max_new_tokens} exceeds this engine's limit {max_new_tokens_limit}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise RequestRejected("bad_sampling", f"seed must be in [0, 2^63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise RequestRejected("bad_sampling", f"at most {MAX_STOP_STRINGS} stop strings of 1..{MAX_STOP_CHARS} "
                                                  "characters")


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    # Requests of one scope may draft from each other's text (engine/drafters/corpus.py); None: from
    # no other request's. The node scopes by client, so no client's speed depends on another's text.
    corpus_scope: str | None = None
    # Who the request is for, in the line for a slot: a free slot goes to the tenant holding the fewest,
    # oldest request first within one (engine.py slot_order). None: one tenant for all such requests,
    # which is first come, first served. The node names the source address, so that one host's many
    # jobs (keys are free) take turns with another host's one instead of going before it.
    tenant: str | None = None


@dataclass
class DraftCounts:
    drafted: int = 0
    verified: int = 0
    accepted: int = 0

    def add(self, drafted: int, verified: int, accepted: int) -> None:
        self.drafted += drafted
        self.verified += verified
        self.accepted += accepted


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    output_tokens: int = 0
    rounds: int = 0               # speculative rounds (the first token, from prefill, is not a round)
    drafted_tokens: int = 0       # tokens the drafter proposed
    verified_tokens: int = 0      # draft tokens sent to the target for verification
    accepted_tokens: int = 0      # draft tokens the target accepted
    rounds_without_bonus: int = 0  # rounds an accepted EOS (or the token limit) ended before their bonus token
    # the three counts above split by DRAFT_SOURCES, for the sources that drafted for this request
    by_source: dict[str, DraftCounts] = field(default_factory=dict)
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0      # wall time of the passes this request was in: what its user waited
    decode_seconds: float = 0.0
    # This request's share of the device's time (`share_pass_time`): what a time price bills. The wall
    # times above count a batched pass once for every request in it, so 32 requests decoding together
    # for one second would bill 32 GPU-seconds.
    device_seconds: float = 0.0
    # accepted_at[k] / reached[k]: conditional acceptance of draft position k+1 given 1..k accepted
    reached: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    # (draft position k from 0, running product of confidences c_1..c_{k+1}, prefix accepted?) per
    # verified position of each round, for drafters with a confidence head (engine/calibration.py)
    confidence_samples: list[tuple[int, float, bool]] = field(default_factory=list)
    # (z_k, u_k) per entry of confidence_samples: the confidence head's inputs before calibration
    # (engine/drafters/confidence.py), what `calibrate` fits on
    confidence_inputs: list[tuple[float, float]] = field(default_factory=list)

    @property
    def round_tokens(self) -> int:
        """Tokens the rounds committed (the first token, from prefill, is none of them): each round's
        accepted drafts and its bonus, which a round ended by an accepted EOS has not (reference §4.4)."""
        return self.accepted_tokens + self.rounds - self.rounds_without_bonus

    @property
    def tau(self) -> float:
        """Mean tokens committed per round (reference §4.4)."""
        return self.round_tokens / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        busy = self.prefill_seconds + self.decode_seconds
        return self.output_tokens / busy if busy > 0 else 0.0


def share_pass_time(rows: list[tuple[RequestStats, int]], seconds: float) -> None:
    """Split one pass's wall time among the requests in it, in proportion to the query tokens each
    put in it (prompt tokens in a prefill pass, verified positions in a round). The shares add up to
    the pass: summed over a node's receipts, billed device time is the device's busy time, not that
    times the batch size."""
    total = sum(n for _, n in rows)
    for stats, n in rows:
        stats.device_seconds += seconds * n / total


@dataclass(frozen=True)
class TokenChunk:
    request_id: str
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    output_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    stats: RequestStats
    error: str = ""


@dataclass(frozen=True)
class EngineInfo:
    model_id: str
    model_digest: bytes          # sha256 over the target weights
    method: str                  # "ar", "ngram", "dspark", ...
    drafter_id: str              # "" for plain decoding
    drafter_digest: bytes
    device: str                  # "cpu" or the GPU name
    dtype: str
    max_context: int             # prompt + new tokens a request may use
    max_batch: int               # concurrent requests decoded together
    block_size: int              # draft tokens per round (gamma); 0 for plain decoding


@dataclass(frozen=True)
class CorpusFill:
    """How much text the cross-request lookup corpus holds now."""
    tokens: int                  # finished requests' text (up to capacity) plus the running ones'
    documents: int               # one per request
    capacity: int                # tokens of finished requests' text kept (engine.lookup_corpus_tokens)


@dataclass(frozen=True)
class RoundReport:
    """What one speculative round over the active batch did (issue: metrics per round)."""
    batch_size: int                  # requests verified together
    drafted: int                     # requests that got a proposal (the rest only verified their anchor)
    verify_tokens: int               # query tokens in the target forward (anchors + drafts)
    budgets: tuple[int, ...]         # draft tokens verified per request
    expected_accepted: float         # scheduler's expectation (sum of prefix survivals), 0 if none
    accepted: int                    # draft tokens accepted in total
    committed: int                   # tokens committed in total (accepted + bonus)
    draft_seconds: float
    schedule_seconds: float
    verify_seconds: float
    round_seconds: float
