"""The confidence head (reference §1.4) with per-position calibration (§4.5, paper §3.2.1).

c_k = sigmoid(z_k / T_k + b_k + w_k u_k), z_k = w . [h_k ; W1[x_{k-1}]] + b (or w . h_k without the
Markov input), the conditional probability that draft slot k is accepted given slots before it were.
x_{k-1} is the sampled draft token (the anchor for slot 0). T_k, b_k and w_k come from the
checkpoint's `confidence_temperatures`, `confidence_offsets` and `confidence_draft_weights`
(calibration); they default to 1, 0 and 0, which is the trained head alone. The paper's STS fits
T_k only; b_k and w_k are our extensions (engine/train/sts.py says why).

u_k is the log-odds that the draft's own distribution (its corrected logits at temperature 1) gives
its likeliest token at slot k. For a greedy request that is the token it proposed, and a draft is
accepted iff it is also the target's argmax, an event the draft's top-1 probability predicts better
than the head, which was trained on sampled acceptance: for the shipped drafter at T=0, AUROC at
position 1 0.75 (head) and 0.81 (u) on held-out prompts, 0.82 together; 0.74 / 0.79 / 0.80 on the
benchmark sets (docs/benchmarks.md). For a sampled request it is not the probability of the token
it drew: c_k decides whether draft k is verified, so it must not depend on draft k's own value
(paper Appendix A), or the output leans toward the drafts q likes.

Greedy requests have their own triple, `confidence_temperatures_greedy` / `_offsets_greedy` /
`_draft_weights_greedy` (fitted by `calibrate --temperature 0`): the event differs from sampled
verification's min(1, p/q), and the pair fitted at T=1 left held-out greedy decoding at 10.4% ECE
at position 1 (floor 2.1%). A checkpoint without greedy entries gives greedy requests the sampled
triple.

A fourth term, v_k h, reads the request's own calibration error so far (`ConfidenceHistory`): at
T=0 position 1's residual error is a shift between prompt kinds (mean c_1 runs 7 points under the
acceptance rate on word problems and 7.6 over on GSM8K), which no per-position scaling removes but
a request sees in its own earlier rounds. h reads only rounds already verified, so c_k still depends
on nothing drawn in this round (Appendix A). `confidence_history_weights` (v_k) and
`confidence_history_prior` per triple; absent, v_k = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# (temperatures, offsets, draft weights) as the checkpoint config gives them, None where absent; calibrate
# fits the complete triple, engine/train/sts.py Scaling
ConfigScaling = tuple[list[float] | None, list[float] | None, list[float] | None]
# (weights v_k, prior) of the history term as the checkpoint config gives them, None where absent
ConfigHistory = tuple[list[float] | None, float | None]

# Pseudo-rounds at the prior rate that both of h's rates start from: h is 0 on a request's first
# round and grows as its rounds accumulate. Held out at T=0, 8 and 32 beat 16 by at most 0.1 point
# of ECE at position 1 on one set each and lost by up to 0.16 on the other (docs/benchmarks.md).
HISTORY_PSEUDO_ROUNDS = 16


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass
class ConfidenceHistory:
    """One request's record at draft position 1 over its verified rounds so far: how often the draft
    was accepted there, and the sum of the history-free c_1 the head predicted for those rounds."""
    rounds: int = 0
    accepted: int = 0
    predicted: float = 0.0
    pending: float | None = None    # this round's history-free c_1, until its verification is known

    def error(self, prior: float) -> float:
        """h: logit of the smoothed acceptance rate minus logit of the smoothed mean prediction, both
        pulled toward `prior` by HISTORY_PSEUDO_ROUNDS rounds; 0 before the first verified round."""
        n = self.rounds + HISTORY_PSEUDO_ROUNDS
        weight = HISTORY_PSEUDO_ROUNDS * prior
        return _logit((self.accepted + weight) / n) - _logit((self.predicted + weight) / n)

    def settle(self, verified: int, accepted: int) -> None:
        """After verification: a round counts when position 1 was verified and c_1 was the head's
        (a lookup row's draft, or a round without a proposal, leaves the record as it was)."""
        if self.pending is not None and verified >= 1:
            self.rounds += 1
            self.accepted += int(accepted >= 1)
            self.predicted += self.pending
        self.pending = None


class ConfidenceHead:
    def __init__(self, weights: dict[str, torch.Tensor], with_markov: bool, block_size: int,
                 sampled: ConfigScaling = (None, None, None), greedy: ConfigScaling = (None, None, None),
                 sampled_history: ConfigHistory = (None, None), greedy_history: ConfigHistory = (None, None)):
        """`sampled` / `greedy`: (temperatures, offsets, draft weights) per position; None entries
        default to 1, 0 and 0, and a greedy triple of Nones to the sampled one (with its history
        term). `*_history`: (weights per position, prior); absent, no history term."""
        self.weight = weights["confidence_head.proj.weight"][0]    # [D]
        self.bias = weights["confidence_head.proj.bias"]            # [1]
        self.with_markov = with_markov
        if all(v is None for v in greedy):
            greedy, greedy_history = sampled, sampled_history
        identity = ([1.0] * block_size, [0.0] * block_size, [0.0] * block_size)
        # index 0: sampled requests, 1: greedy ones
        rows = [[v if v is not None else default for v, default in zip(scaling, identity)]
                for scaling in (sampled, greedy)]
        self.temperatures, self.offsets, self.draft_weights = (
            torch.tensor([rows[0][i], rows[1][i]], dtype=torch.float32, device=self.weight.device) for i in range(3))
        histories = (sampled_history, greedy_history)
        self.history_weights = torch.tensor([w if w is not None else [0.0] * block_size for w, _ in histories],
                                            dtype=torch.float32, device=self.weight.device)
        self.history_priors = [prior for _, prior in histories]
        self.uses_history = bool(self.history_weights.any())

    def history(self, records: list[ConfidenceHistory], greedy: list[bool]) -> torch.Tensor | None:
        """h per row [R] from each request's record and its triple's prior; None without a history term."""
        if not self.uses_history:
            return None
        h = [record.error(self.history_priors[g]) if self.history_priors[g] is not None else 0.0
             for record, g in zip(records, greedy)]
        return torch.tensor(h, dtype=torch.float32, device=self.weight.device)

    def logits(self, hidden: torch.Tensor, prev_features: torch.Tensor | None) -> torch.Tensor:
        """hidden [R, L, H], prev_features [R, L, r] (W1 of the previous tokens) -> raw z [R, L] fp32."""
        x = torch.cat([hidden, prev_features.to(hidden.dtype)], dim=-1) if self.with_markov else hidden
        return (x @ self.weight + self.bias).float()

    def scale(self, z: torch.Tensor, draft_logodds: torch.Tensor, greedy: torch.Tensor, first: int = 0,
              history: torch.Tensor | None = None) -> torch.Tensor:
        """z, draft_logodds [R, L] fp32 of slots first..first+L-1, greedy [R] bool (which triple each
        row's request takes), history [R] (h, or None for the history-free c) -> c [R, L]."""
        cols = slice(first, first + z.shape[1])
        row = greedy.long().to(z.device)
        x = z / self.temperatures[row, cols] + self.offsets[row, cols] + self.draft_weights[row, cols] * draft_logodds
        if history is not None:
            x = x + self.history_weights[row, cols] * history[:, None]
        return torch.sigmoid(x)
