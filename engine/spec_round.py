"""One speculative round over the active batch (reference §4.3):
draft -> schedule -> verify (one target forward over a ragged batch) -> accept -> commit.

Plain decoding is the same round with an empty proposal: each request verifies only its anchor.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from engine.api import DraftCounts, RoundReport, share_pass_time
from engine.calibration import record as record_confidence, tally_positions
from engine.drafters.base import Drafter, Horizon, Proposal
from engine.model import KVCache, TargetModel
from engine.prefix_scheduler import PrefixScheduler
from engine.sampling import accept_greedy, target_distributions, verify_block, verify_seeded
from engine.sequence import Sequence

# (seqs, proposal, caps) -> per-request number of draft tokens to verify, each <= its cap
Schedule = Callable[[list[Sequence], Proposal, list[int]], tuple[list[int], float]]


def full_block(seqs: list[Sequence], proposal: Proposal, caps: list[int]) -> tuple[list[int], float]:
    """Verify everything proposed (the fixed-gamma baseline)."""
    return [min(len(t), c) for t, c in zip(proposal.tokens, caps)], 0.0


def fit_budget(budgets: list[int], budget: int) -> list[int]:
    """Trim the longest proposals until anchors + drafts fit the step's token budget."""
    budgets = list(budgets)
    while sum(budgets) + len(budgets) > budget and any(budgets):
        longest = max(range(len(budgets)), key=budgets.__getitem__)
        budgets[longest] -= 1
    return budgets


def build_verify_batch(seqs: list[Sequence], proposal: Proposal, budgets: list[int],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [anchor, x_1..x_L] at positions kv_len.., padded to the longest row (the forward
    packs real tokens and ignores the padding)."""
    width = max(budgets) + 1
    rows = []
    for r, (seq, L) in enumerate(zip(seqs, budgets)):
        row = [seq.tokens[-1], *proposal.tokens[r][:L]]
        rows.append(row + [row[-1]] * (width - len(row)))
    # One tensor for the batch, not one per row (~3 ms of host time a round at 256 rows).
    positions = torch.tensor([seq.kv_len for seq in seqs])[:, None] + torch.arange(width)
    return torch.tensor(rows).to(device), positions.to(device)


def commit_tokens(seq: Sequence, draft: list[int], accepted: int, bonus: int,
                  eos_ids: tuple[int, ...]) -> list[int]:
    """Tokens this round commits: the accepted drafts and the bonus, cut after an EOS (no bonus
    follows an accepted EOS, reference §4.3 step 5) and at the request's token limit."""
    new = [*draft[:accepted], bonus]
    for i, tok in enumerate(new):
        if tok in eos_ids:
            new = new[:i + 1]
            break
    return new[:seq.remaining]


def propose_for(drafter: Drafter, seqs: list[Sequence], drafting: list[bool], horizon: Horizon | None) -> Proposal:
    """The drafter's proposal for the requests marked in `drafting`, an empty one for the rest
    (they verify only their anchor: plain decoding this round)."""
    chosen = [seq for seq, d in zip(seqs, drafting) if d]
    if len(chosen) == len(seqs):
        return drafter.propose(seqs, horizon)
    proposal = Drafter.propose(drafter, seqs)
    if chosen:
        part = drafter.propose(chosen, horizon)
        rows = [r for r, d in enumerate(drafting) if d]
        for i, r in enumerate(rows):
            proposal.tokens[r], proposal.probs[r] = part.tokens[i], part.probs[i]
            proposal.confidence[r], proposal.confidence_inputs[r] = part.confidence[i], part.confidence_inputs[i]
            proposal.sources[r] = part.sources[i]
    return proposal


def speculative_round(target: TargetModel, cache: KVCache, drafter: Drafter, seqs: list[Sequence],
                      schedule: Schedule, eos_ids: tuple[int, ...], token_budget: int,
                      drafting: list[bool] | None = None) -> tuple[RoundReport, list[list[int]]]:
    """`drafting`: which requests get a proposal this round (all when None). A request without one
    verifies only its anchor; the drafter still receives its verified positions' features, so its
    context stays complete."""
    t0 = time.perf_counter()
    drafting = [True] * len(seqs) if drafting is None else drafting
    # Never verify more than can be committed: a round commits at most budget + 1 tokens.
    caps = [max(0, min(drafter.block_size, seq.remaining - 1)) for seq in seqs]
    horizon = schedule.horizon(seqs, caps) if isinstance(schedule, PrefixScheduler) else None
    proposal = propose_for(drafter, seqs, drafting, horizon)
    t1 = time.perf_counter()
    budgets, expected = schedule(seqs, proposal, caps)
    budgets = fit_budget(budgets, token_budget)
    t2 = time.perf_counter()
    tokens, positions = build_verify_batch(seqs, proposal, budgets, target.device)
    slots = torch.tensor([seq.slot for seq in seqs], device=target.device)
    out = target.forward(tokens, positions, slots, cache, taps=drafter.tap_layers,
                         lengths=[L + 1 for L in budgets])
    logits = target.logits(out.hidden)
    # The greedy requests' argmax in one go: one copy to the host (one GPU sync) per round, not one
    # per request. max().indices picks the first maximum as argmax does, and on CPU takes a third of
    # its time (4.5 against 15.5 ms for 256 rows of SmolLM2's 49k logits, 2 threads).
    argmax = logits.max(dim=-1).indices.tolist() if any(seq.request.sampling.greedy for seq in seqs) else None
    sampled = [r for r, seq in enumerate(seqs) if not seq.request.sampling.greedy]
    dists = dict(zip(sampled, target_distributions([(logits[r, :budgets[r] + 1], seqs[r].request.sampling)
                                                     for r in sampled], device="cpu")))
    committed: list[list[int]] = []
    accepted_total = 0
    for r, (seq, L) in enumerate(zip(seqs, budgets)):
        draft = proposal.tokens[r][:L]
        probs = proposal.probs[r]
        if seq.request.sampling.greedy:
            a, bonus = accept_greedy(draft, argmax[r][:L + 1])
        elif seq.request.sampling.seed is not None:
            a, bonus = verify_seeded(draft, dists[r], seq.request.sampling.seed, len(seq.output_ids))
        else:
            a, bonus = verify_block(draft, None if probs is None else probs[:L], dists[r], seq.generator)
        new = commit_tokens(seq, draft, a, bonus, eos_ids)
        # An accepted EOS ends the round: the drafts verified after it are not accepted (reference §4.3
        # step 5, "truncate a to include it"), for the stats, calibration records and lookup counts.
        a = min(a, len(new))
        seq.stats.rounds_without_bonus += len(new) == a
        seq.tokens.extend(new)
        seq.kv_len += a + 1
        _count(seq, proposal.sources[r], len(proposal.tokens[r]), L, a)
        record_confidence(seq.stats, proposal.confidence[r], proposal.confidence_inputs[r], L, a)
        seq.last_round = (proposal.sources[r], L, a, proposal.confidence[r] is not None)
        accepted_total += a
        committed.append(new)
        drafter.commit(seq, None if out.taps is None else out.taps[r, :a + 1], L, a)
    t3 = time.perf_counter()
    for seq in seqs:
        seq.stats.decode_seconds += t3 - t0
    share_pass_time([(seq.stats, L + 1) for seq, L in zip(seqs, budgets)], t3 - t0)
    report = RoundReport(
        batch_size=len(seqs), drafted=sum(drafting) if drafter.block_size else 0,
        verify_tokens=sum(budgets) + len(seqs), budgets=tuple(budgets),
        expected_accepted=expected, accepted=accepted_total, committed=sum(map(len, committed)),
        draft_seconds=t1 - t0, schedule_seconds=t2 - t1, verify_seconds=t3 - t2, round_seconds=t3 - t0)
    return report, committed


def uncount_dropped(seq: Sequence, kept: int) -> None:
    """The last round's tokens after its first `kept` were dropped (a stop string completed there,
    `Engine._back_to_stop`): its drafts past them are not accepted, as after an accepted EOS, in the
    stats a receipt signs and the calibration records. The drafter's own counts keep them: the target
    did take those drafts."""
    source, verified, accepted, recorded = seq.last_round
    if accepted <= kept:
        return
    s = seq.stats
    s.accepted_tokens -= accepted - kept
    s.by_source[source].accepted -= accepted - kept
    # the round's per-position tallies as counted, replaced by those `tally_positions` gives `kept`
    counted, corrected = ([], []), ([], [])
    tally_positions(*counted, verified, accepted)
    tally_positions(*corrected, verified, kept)
    for k in range(verified):
        s.reached[k] += corrected[0][k] - counted[0][k]
        s.accepted_at[k] += corrected[1][k] - counted[1][k]
    if recorded:   # the round's records are the last `verified` (engine/calibration.py `record`)
        first = len(s.confidence_samples) - verified
        for k in range(kept, accepted):
            position, survival, _ = s.confidence_samples[first + k]
            s.confidence_samples[first + k] = (position, survival, False)


def _count(seq: Sequence, source: str, drafted: int, verified: int, accepted: int) -> None:
    s = seq.stats
    s.rounds += 1
    s.drafted_tokens += drafted
    s.verified_tokens += verified
    s.accepted_tokens += accepted
    if drafted:
        s.by_source.setdefault(source, DraftCounts()).add(drafted, verified, accepted)
    tally_positions(s.reached, s.accepted_at, verified, accepted)
