"""The hardware-aware prefix scheduler (paper Algorithm 1) and its asynchronous variant (§5.2).

Given each request's calibrated conditional confidences c_{r,1..gamma}, the prefix survival
a_{r,j} = prod_{i<=j} c_{r,i} is the probability that draft j is accepted. Admitting drafts grows the
expected committed tokens tau = sum(1 + sum_{j<=l_r} a_{r,j}) and the verification batch; the
scheduler keeps the admission that maximises throughput Theta = tau * SPS.

A deviation in how the batch grows: the paper admits one (r, j) at a time in descending order of a,
as its step cost is a function of the token count B. Ours is a function of the rows R and the width
W = 1 + max l_r (engine/sps.py): every draft at a position j below the current width costs nothing
more, the first one at a new position costs a whole width of every row. One-at-a-time admission then
sees Theta fall at the first draft of each new position, and from 4 rows up stopped before any draft
(docs/benchmarks.md). So the greedy path walks widths, W = 1, 2, ...; the step to width j + 1 admits
every request's draft j that survives (a > 0), in descending order of a within the step only where
the token budget cuts it.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable

import torch

from engine.drafters.base import Proposal
from engine.sequence import Sequence

Sps = Callable[[int, int], float]   # (rows, width) -> target steps per second


def survivals(confidences: list[torch.Tensor | None], caps: list[int]) -> list[list[float]]:
    out = []
    for conf, cap in zip(confidences, caps):
        if conf is None or cap == 0:
            out.append([])
            continue
        out.append(torch.cumprod(conf[:cap].double(), 0).tolist())
    return out


def _width_steps(surv: list[list[float]], budget: int | None) -> list[list[tuple[float, int, int]]]:
    """The greedy path as steps of one width each: step j holds the candidates (a, r, j) for draft
    position j with a > 0, a descending. Under a token budget (anchors count first) the path ends
    where it is spent, the last step cut to the highest survivals."""
    room = None if budget is None else max(0, budget - len(surv))
    steps = []
    for j in range(1, max((len(row) for row in surv), default=0) + 1):
        step = sorted(((row[j - 1], r, j) for r, row in enumerate(surv) if len(row) >= j and row[j - 1] > 0),
                      key=lambda c: -c[0])
        if room is not None:
            step = step[:room]
            room -= len(step)
        if not step:
            break
        steps.append(step)
    return steps


def _theta_along(steps: list[list[tuple[float, int, int]]], R: int, sps: Sps):
    """(Theta, tau) at width 1 and after each width step."""
    tau = float(R)
    yield tau * sps(R, 1), tau
    for width, step in enumerate(steps, 2):
        tau += sum(a for a, _, _ in step)
        yield tau * sps(R, width), tau


def _lengths(R: int, admitted: Iterable[tuple[float, int, int]]) -> list[int]:
    lengths = [0] * R
    for _, r, j in admitted:
        lengths[r] = max(lengths[r], j)
    return lengths


def algorithm1(surv: list[list[float]], sps: Sps, budget: int | None = None) -> tuple[list[int], float]:
    """Synchronous scheduler: walk the greedy path and stop at the first step that does not raise
    Theta. The break is what keeps it lossless (Appendix A): whether draft j is admitted may depend
    only on confidences that do not depend on draft j's own sampled value."""
    R, steps = len(surv), _width_steps(surv, budget)
    path = _theta_along(steps, R, sps)
    best, best_tau = next(path)
    taken = 0
    for n, (theta, tau) in enumerate(path, 1):
        if theta <= best:
            break
        best, best_tau, taken = theta, tau, n
    return _lengths(R, (c for step in steps[:taken] for c in step)), best_tau - R


def capacity(surv: list[list[float]], sps: Sps, budget: int | None = None) -> int:
    """§5.2: the number of draft tokens K at the global argmax of Theta along the greedy path,
    searched without a break (the curve may be jagged)."""
    steps = _width_steps(surv, budget)
    thetas = [theta for theta, _ in _theta_along(steps, len(surv), sps)]
    best = max(range(len(thetas)), key=thetas.__getitem__)   # the first of equal maxima
    return sum(map(len, steps[:best]))


def top_k(surv: list[list[float]], k: int, budget: int | None = None) -> tuple[list[int], float]:
    """Admit the k candidates of highest current survival (prefix-closed by construction)."""
    cands = sorted((c for step in _width_steps(surv, budget) for c in step), key=lambda c: (-c[0], c[2]))[:k]
    return _lengths(len(surv), cands), sum(a for a, _, _ in cands)


class AdmissionHorizon:
    """Where Algorithm 1 stops, found while the drafts are still being drafted, so that the
    drafter's sequential part (the Markov head's slot-by-slot sampling, paper §3.1) stops there
    too. Not in the paper, whose drafts are cheap next to its target; here a DSpark slot costs ~1.9
    ms of a 25 ms draft for 16 rows, and Algorithm 1 rarely verifies past slot 3 (docs/benchmarks.md).

    The greedy path's step to width k + 1 reads only survivals at position k, so once slot k is
    drafted the first k steps are known exactly; when the walk has ended by then (a step that does
    not raise Theta, no candidate left, the token budget spent), no draft at slot k + 1 is ever
    verified, and the scheduler returns the same lengths for blocks cut after slot k as for whole
    ones. A bound on the next step from survival at k (a_{r,k+1} <= a_{r,k}) was tried as well: on
    decreasing SPS curves it stopped no block earlier. The async variant's capacity reads whole
    confidence vectors of two rounds earlier, so it gets no horizon.
    """

    def __init__(self, seqs: list[Sequence], caps: list[int], sps: Sps, budget: int | None):
        self.order = {seq.request_id: r for r, seq in enumerate(seqs)}
        self.caps, self.sps, self.budget = caps, sps, budget
        self.known: list[list[float]] = [[] for _ in seqs]   # per row: survivals so far, within its cap

    def fix(self, seq: Sequence, confidence: torch.Tensor) -> None:
        r = self.order[seq.request_id]
        self.known[r] = survivals([confidence], [self.caps[r]])[0]

    def more(self, seqs: list[Sequence], slot: int, confidence: torch.Tensor) -> bool:
        for seq, c in zip(seqs, confidence.tolist()):
            r = self.order[seq.request_id]
            row = self.known[r]
            if len(row) < min(slot, self.caps[r]):
                row.append((row[-1] if row else 1.0) * c)   # survivals()' double products
        steps = _width_steps([row[:slot] for row in self.known], self.budget)
        if len(steps) < slot:
            return False
        path = list(_theta_along(steps, len(self.known), self.sps))
        return all(theta > before for (theta, _), (before, _) in zip(path[1:], path))


class PrefixScheduler:
    """A `Schedule` for the speculative round. mode "sync" = Algorithm 1; "async" = capacity from
    the confidences of two rounds earlier (a causal barrier: K cannot depend on this round's draft
    tokens), then top-K admission by current survival. "Rounds" are a request's rounds with a
    proposal: counting the ones the draft backoff skips left a request that drafts every 4th round or
    less often with nothing two rounds back, so it never verified, backed off further and never
    recovered."""

    def __init__(self, sps: Sps, mode: str = "sync", budget: int | None = None):
        if mode not in ("sync", "async"):
            raise ValueError(f"scheduler mode must be 'sync' or 'async', got {mode!r}")
        self.sps = sps
        self.mode = mode
        self.budget = budget
        self.history: dict[str, deque[torch.Tensor | None]] = {}

    def horizon(self, seqs: list[Sequence], caps: list[int]) -> AdmissionHorizon | None:
        """The round's `AdmissionHorizon` (sync mode only), rows in the order `__call__` gets them."""
        return AdmissionHorizon(seqs, caps, self.sps, self.budget) if self.mode == "sync" else None

    def __call__(self, seqs: list[Sequence], proposal: Proposal, caps: list[int]) -> tuple[list[int], float]:
        caps = [min(len(t), c) for t, c in zip(proposal.tokens, caps)]
        confidences = proposal.confidence
        # A drafter without confidences gets its whole proposal (fixed gamma).
        fixed = [conf is None for conf in confidences]
        surv = survivals(confidences, caps)
        if self.mode == "sync":
            lengths, expected = algorithm1(surv, self.sps, self.budget)
        else:
            stale = []
            for seq, conf, cap in zip(seqs, confidences, caps):
                hist = self.history.setdefault(seq.request_id, deque(maxlen=3))
                if conf is None:   # no proposal this round (the backoff paused it): none remembered
                    stale.append([])
                    continue
                hist.append(conf)
                old = hist[0] if len(hist) == 3 else None  # its proposal two proposals ago
                stale.append([] if old is None else torch.cumprod(old[:cap].double(), 0).tolist())
            live = {seq.request_id for seq in seqs}
            for rid in [rid for rid in self.history if rid not in live]:
                del self.history[rid]
            lengths, expected = top_k(surv, capacity(stale, self.sps, self.budget), self.budget)
        return [cap if f else n for n, cap, f in zip(lengths, caps, fixed)], expected
