"""The hardware-aware prefix scheduler (paper Algorithm 1) and its asynchronous variant (§5.2).

Given each request's calibrated conditional confidences c_{r,1..gamma}, the prefix survival
a_{r,j} = prod_{i<=j} c_{r,i} is the probability that draft j is accepted. Admitting (r, j) in
descending order of a grows the verification batch B = sum(1 + l_r) by one token and the expected
committed tokens tau = sum(1 + sum_{j<=l_r} a_{r,j}) by a_{r,j}; the scheduler keeps the prefix
that maximises throughput Theta = tau * SPS(B).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from engine.drafters.base import Proposal
from engine.sequence import Sequence

Sps = Callable[[int], float]


def survivals(confidences: list[torch.Tensor | None], caps: list[int]) -> list[list[float]]:
    out = []
    for conf, cap in zip(confidences, caps):
        if conf is None or cap == 0:
            out.append([])
            continue
        out.append(torch.cumprod(conf[:cap].double(), 0).tolist())
    return out


def _greedy_path(surv: list[list[float]], budget: int | None) -> list[tuple[float, int, int]]:
    """Candidates (a, r, j) in admission order: a descending, then j ascending (prefix order),
    cut where the verification batch would exceed `budget` tokens (anchors count first)."""
    cands = [(a, r, j + 1) for r, row in enumerate(surv) for j, a in enumerate(row) if a > 0]
    cands.sort(key=lambda c: (-c[0], c[2]))
    if budget is not None:
        cands = cands[:max(0, budget - len(surv))]
    return cands


def algorithm1(surv: list[list[float]], sps: Sps, budget: int | None = None) -> tuple[list[int], float]:
    """Synchronous scheduler: walk the greedy path and stop at the first step that does not raise
    Theta. The break is what keeps it lossless (Appendix A): whether draft j is admitted may depend
    only on confidences that do not depend on draft j's own sampled value."""
    R = len(surv)
    lengths, best_lengths = [0] * R, [0] * R
    B, tau = R, float(R)
    best = tau * sps(B)
    best_tau = tau
    for a, r, j in _greedy_path(surv, budget):
        lengths[r] = j
        B += 1
        tau += a
        theta = tau * sps(B)
        if theta > best:
            best, best_tau, best_lengths = theta, tau, list(lengths)
        else:
            break
    return best_lengths, best_tau - R


def capacity(surv: list[list[float]], sps: Sps, budget: int | None = None) -> int:
    """§5.2: the number of draft tokens K at the global argmax of Theta along the greedy path,
    searched without a break (the curve may be jagged)."""
    R = len(surv)
    B, tau = R, float(R)
    best, best_k = tau * sps(B), 0
    for k, (a, _, _) in enumerate(_greedy_path(surv, budget), 1):
        B += 1
        tau += a
        theta = tau * sps(B)
        if theta > best:
            best, best_k = theta, k
    return best_k


def top_k(surv: list[list[float]], k: int, budget: int | None = None) -> tuple[list[int], float]:
    """Admit the k candidates of highest current survival (prefix-closed by construction)."""
    lengths = [0] * len(surv)
    expected = 0.0
    for a, r, j in _greedy_path(surv, budget)[:k]:
        lengths[r] = max(lengths[r], j)
        expected += a
    return lengths, expected


class PrefixScheduler:
    """A `Schedule` for the speculative round. mode "sync" = Algorithm 1; "async" = capacity from
    the confidences of two rounds earlier (a causal barrier: K cannot depend on this round's draft
    tokens), then top-K admission by current survival."""

    def __init__(self, sps: Sps, mode: str = "sync", budget: int | None = None):
        if mode not in ("sync", "async"):
            raise ValueError(f"scheduler mode must be 'sync' or 'async', got {mode!r}")
        self.sps = sps
        self.mode = mode
        self.budget = budget
        self.history: dict[str, deque[torch.Tensor | None]] = {}

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
                hist.append(conf)
                old = hist[0] if len(hist) == 3 else None  # confidences from two rounds ago
                stale.append([] if old is None else torch.cumprod(old[:cap].double(), 0).tolist())
            live = {seq.request_id for seq in seqs}
            for rid in [rid for rid in self.history if rid not in live]:
                del self.history[rid]
            lengths, expected = top_k(surv, capacity(stale, self.sps, self.budget), self.budget)
        return [cap if f else n for n, cap, f in zip(lengths, caps, fixed)], expected
