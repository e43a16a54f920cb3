"""Stop paying for drafts nobody verifies.

When the confidence scheduler verifies nothing for a whole round (on hardware where a wider verify
is expensive, or with a weak drafter), the draft forward was pure overhead. After such a round the
engine skips drafting for 1, 2, 4, ... up to `max_skip` rounds, then drafts again to re-probe; any
round that verifies a draft resets the backoff. Not drafting is always lossless: the round then
verifies only the anchors, i.e. plain decoding. (A deviation from the paper, which always drafts:
there the draft is cheap next to the target; here, with a 135M target and a 49k vocabulary, the
draft's LM head alone costs about one target step.)
"""

from __future__ import annotations


class DraftBackoff:
    def __init__(self, max_skip: int = 16):
        self.max_skip = max_skip
        self.skip = 0
        self.next_skip = 1

    def should_draft(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def observe(self, budgets: tuple[int, ...]) -> None:
        """After a round that drafted: back off if it verified nothing, else reset."""
        if any(budgets):
            self.next_skip = 1
        else:
            self.skip = self.next_skip
            self.next_skip = min(2 * self.next_skip, self.max_skip)
