"""Stop paying for drafts that do not pay for themselves, request by request.

The paper always drafts: on its GPUs a draft is cheap next to the target, and Algorithm 1 only
decides how much of it to verify. Here (a 135M target and a 49k vocabulary on a CPU) one draft
costs most of a target step, so a round that verifies little can commit tokens more slowly than
plain decoding would have. How predictable the text is differs per request (code that restates its
prompt, chat that does not), so each request keeps its own account: after a round that drafted for
it, its realised speed (tokens committed per second of its share of the round) is compared with
plain decoding's at the same batch size, R tokens per 1 / SPS(R) seconds from the profile (paper
§3.2.2). Its share is a plain round's cost per request, plus the draft's cost split evenly over the
requests drafted for, plus the verification time beyond a plain round, split in proportion to the
draft tokens each verified. The ratio is smoothed over rounds (one round commits a whole number of
tokens, so a single round says little). While it is below 1, or a round verified nothing for it,
the request drafts only every 2nd, 4th, ... up to every `max_period`-th round, to re-probe; a round
that pays puts it back to drafting every round. Without a profile (threshold truncation) only
"verified nothing" counts.

The re-probes sit on a grid shared by all requests (round numbers divisible by the period), so that
the requests backed off to the same period probe in the same round and share one draft forward: a
DSpark draft for one row takes a quarter of one for sixteen (23-28 ms against 101-118 ms, SmolLM2
on the 2-core box), so sixteen requests probing in sixteen different rounds would cost ~3.6x one
probe for all of them.

A request that joins starts at the period of the running requests and of the last few that left
(their median), not at 1: in a backed-off engine a newcomer probes with the others instead of at
rounds 1, 3, 5, 9, ... of its own (at one user that cost a fifth of the speed when each request
started afresh).

The longest period grows with what a probe costs: `max_period` rounds for a draft that costs one
plain round, proportionally more (in powers of two) for one that costs more. A draft for sixteen rows
cost ~1.8 plain rounds when this was written (~100 against ~57 ms, SmolLM2 bf16 on the 2-core box),
so sixteen backed-off requests probing every 64 rounds lost 2-3% of plain decoding's speed; every
128 rounds, ~1%. Measured again on 2026-12-01 (32 requests at 16 users): a probe of 10-14 rows
after a 64-round pause drafts in 36-56 ms, a smoothed cost of 0.8-1.0 rounds, so 64-128.

Only the drafter's own proposals are judged: a proposal that cost no forward (a lookup hit,
engine/drafters/lookup.py) neither resets a request's period nor backs it off.

Not drafting is always lossless: the request then verifies only its anchor, i.e. plain decoding.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

from engine.api import RoundReport


@dataclass
class RequestBackoff:
    period: int = 1             # drafts in rounds whose number is a multiple of this (1: every round)
    speed_ratio: float = 1.0    # smoothed speed of its drafted rounds / plain decoding's


class DraftBackoff:
    # A probe that does not pay costs a draft and a short verify: 104-118 ms against a 61-69 ms plain
    # round (SmolLM2 on the 2-core box, batch 1). One probe per 16 rounds was ~4% of plain decoding's
    # speed once backed off (and 7-11% lost at 8-16 users); per 64 it is ~1%, for a re-probe at most
    # 64 rounds after the text turns predictable.
    def __init__(self, max_period: int = 64, smoothing: float = 0.75, remembered: int = 8):
        self.max_period = max_period
        self.smoothing = smoothing
        self.probe_cost = 1.0     # a draft's cost in plain rounds, smoothed
        self.requests: dict[str, RequestBackoff] = {}
        self.left: deque[int] = deque(maxlen=remembered)   # periods of the last requests to leave
        self.round = 0

    def drafting(self, request_ids: list[str]) -> list[bool]:
        """Which of this round's requests get a draft (a request seen for the first time joins)."""
        out = [self.round % (self.requests.get(rid) or self._join(rid)).period == 0 for rid in request_ids]
        self.round += 1
        return out

    def _join(self, request_id: str) -> RequestBackoff:
        periods = [s.period for s in self.requests.values()] + list(self.left)
        state = RequestBackoff(period=statistics.median_low(periods) if periods else 1)
        self.requests[request_id] = state
        return state

    def release(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            self.left.append(state.period)

    def observe(self, request_ids: list[str], drafted: list[bool], committed: list[int], report: RoundReport,
                plain_seconds: float | None) -> None:
        """After a round: `drafted`/`committed` per request in the round's order; `plain_seconds`:
        what a plain round of this batch would take (None without a profile)."""
        drafters = sum(drafted)
        if drafters == 0:
            return
        if plain_seconds:
            cost = (report.draft_seconds + report.schedule_seconds) / plain_seconds
            self.probe_cost = self.smoothing * self.probe_cost + (1 - self.smoothing) * cost
        verified = sum(report.budgets)
        for rid, was_drafted, n, budget in zip(request_ids, drafted, committed, report.budgets):
            if not was_drafted:
                continue
            state = self.requests[rid]
            paid = budget > 0
            if plain_seconds is not None and report.round_seconds > 0:
                plain_share = plain_seconds / report.batch_size
                extra_verify = max(0.0, report.verify_seconds - plain_seconds) * budget / verified if verified else 0.0
                share = plain_share + (report.draft_seconds + report.schedule_seconds) / drafters + extra_verify
                state.speed_ratio = self.smoothing * state.speed_ratio + (1 - self.smoothing) * n * plain_share / share
                paid = paid and state.speed_ratio >= 1.0
            state.period = 1 if paid else min(2 * state.period, self.longest_period())

    def longest_period(self) -> int:
        period = self.max_period
        while period < self.probe_cost * self.max_period and period < 16 * self.max_period:
            period *= 2
        return period
