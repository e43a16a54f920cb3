"""The confidence head (reference §1.4) with per-position calibration (§4.5, paper §3.2.1).

c_k = sigmoid(z_k / T_k + b_k + w_k u_k), z_k = w . [h_k ; W1[x_{k-1}]] + b (or w . h_k without the
Markov input), the conditional probability that draft slot k is accepted given slots before it were.
x_{k-1} is the sampled draft token (the anchor for slot 0). T_k, b_k and w_k come from the
checkpoint's `confidence_temperatures`, `confidence_offsets` and `confidence_draft_weights`
(calibration); they default to 1, 0 and 0, which is the trained head alone. The paper's STS fits
T_k only; b_k and w_k are our extensions (engine/train/calibrate.py says why).

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
"""

from __future__ import annotations

import torch

# (temperatures, offsets, draft weights) as the checkpoint config gives them, None where absent; calibrate
# fits the complete triple, engine/train/calibrate.py Scaling
ConfigScaling = tuple[list[float] | None, list[float] | None, list[float] | None]


class ConfidenceHead:
    def __init__(self, weights: dict[str, torch.Tensor], with_markov: bool, block_size: int,
                 sampled: ConfigScaling = (None, None, None), greedy: ConfigScaling = (None, None, None)):
        """`sampled` / `greedy`: (temperatures, offsets, draft weights) per position; None entries
        default to 1, 0 and 0, and a greedy triple of Nones to the sampled one."""
        self.weight = weights["confidence_head.proj.weight"][0]    # [D]
        self.bias = weights["confidence_head.proj.bias"]            # [1]
        self.with_markov = with_markov
        if all(v is None for v in greedy):
            greedy = sampled
        identity = ([1.0] * block_size, [0.0] * block_size, [0.0] * block_size)
        # index 0: sampled requests, 1: greedy ones
        rows = [[v if v is not None else default for v, default in zip(scaling, identity)]
                for scaling in (sampled, greedy)]
        self.temperatures, self.offsets, self.draft_weights = (
            torch.tensor([rows[0][i], rows[1][i]], dtype=torch.float32, device=self.weight.device) for i in range(3))

    def logits(self, hidden: torch.Tensor, prev_features: torch.Tensor | None) -> torch.Tensor:
        """hidden [R, L, H], prev_features [R, L, r] (W1 of the previous tokens) -> raw z [R, L] fp32."""
        x = torch.cat([hidden, prev_features.to(hidden.dtype)], dim=-1) if self.with_markov else hidden
        return (x @ self.weight + self.bias).float()

    def scale(self, z: torch.Tensor, draft_logodds: torch.Tensor, greedy: torch.Tensor, first: int = 0) -> torch.Tensor:
        """z, draft_logodds [R, L] fp32 of slots first..first+L-1, greedy [R] bool (which triple each
        row's request takes) -> c [R, L]."""
        cols = slice(first, first + z.shape[1])
        row = greedy.long().to(z.device)
        return torch.sigmoid(z / self.temperatures[row, cols] + self.offsets[row, cols]
                             + self.draft_weights[row, cols] * draft_logodds)
