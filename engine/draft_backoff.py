"""Stop paying for drafts that do not pay for themselves.

The paper always drafts: on its GPUs a draft is cheap next to the target, and Algorithm 1 only
decides how much of it to verify. Here (a 135M target and a 49k vocabulary on a CPU) one draft
costs most of a target step, so a round that verifies little can commit tokens more slowly than
plain decoding would have. After each drafted round the engine compares the round's realised
speed, committed tokens per second, with plain decoding's at the same batch size, R tokens per
1 / SPS(R) seconds from the profile (paper §3.2.2). The ratio is smoothed over rounds (one round
commits a whole number of tokens, so a single round says little). While it is below 1 or a round
verified nothing, the engine skips drafting for 1, 2, 4, ... up to `max_skip` rounds, then drafts
again to re-probe; a round that pays resets the backoff. Without a profile (threshold truncation)
only "verified nothing" counts. Not drafting is always lossless: the round then verifies only the
anchors, i.e. plain decoding.
"""

from __future__ import annotations

from engine.api import RoundReport


class DraftBackoff:
    # A probe that does not pay costs a draft and a short verify: 104-118 ms against a 61-69 ms plain
    # round (SmolLM2 on the 2-core box, batch 1). Capped at 16 skipped rounds that was ~4% of plain
    # decoding's speed once backed off (and 7-11% lost at 8-16 users); at 64 it is ~1%, for a
    # re-probe at most 64 rounds after the text turns predictable.
    def __init__(self, max_skip: int = 64, smoothing: float = 0.75):
        self.max_skip = max_skip
        self.smoothing = smoothing
        self.skip = 0
        self.next_skip = 1
        self.speed_ratio = 1.0      # smoothed speed of drafted rounds / plain decoding's

    def should_draft(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def observe(self, report: RoundReport, plain_seconds: float | None) -> None:
        """After a round that drafted; `plain_seconds`: what a plain round of this batch would take."""
        paid = any(report.budgets)
        if plain_seconds is not None and report.round_seconds > 0:
            ratio = report.committed * plain_seconds / (report.batch_size * report.round_seconds)
            self.speed_ratio = self.smoothing * self.speed_ratio + (1 - self.smoothing) * ratio
            paid = paid and self.speed_ratio >= 1.0
        if paid:
            self.next_skip = 1
        else:
            self.skip = self.next_skip
            self.next_skip = min(2 * self.next_skip, self.max_skip)
