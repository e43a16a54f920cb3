"""The confidence head (reference §1.4) with per-position calibration (§4.5, paper §3.2.1).

c_k = sigmoid(z_k / T_k + b_k), z_k = w . [h_k ; W1[x_{k-1}]] + b (or w . h_k without the Markov
input), the conditional probability that draft slot k is accepted given slots before it were.
x_{k-1} is the sampled draft token (the anchor for slot 0). T_k and b_k come from the checkpoint's
`confidence_temperatures` and `confidence_offsets` (calibration); they default to 1 and 0. The
paper's STS fits T_k only; b_k is our extension (engine/train/calibrate.py says why).

Greedy requests may have their own pair, `confidence_temperatures_greedy` / `_offsets_greedy`
(fitted by `calibrate --temperature 0`): under greedy verification a draft is accepted iff it is
the target's argmax, another event than sampled verification's min(1, p/q), and the head ranks it
better (AUROC ~0.77 against ~0.65 at position 1 for the shipped drafter). The pair fitted at T=1
left held-out greedy decoding at 10.4% ECE at position 1 (floor 2.1%); a greedy pair brings it to
4.0% (docs/benchmarks.md). Without the greedy pair, every request uses the first.
"""

from __future__ import annotations

import torch


class ConfidenceHead:
    def __init__(self, weights: dict[str, torch.Tensor], with_markov: bool, block_size: int,
                 sampled: tuple[list[float] | None, list[float] | None] = (None, None),
                 greedy: tuple[list[float] | None, list[float] | None] = (None, None)):
        """`sampled` / `greedy`: (temperatures, offsets) per position; None entries default to 1 and 0
        (sampled) or to the sampled pair (greedy)."""
        self.weight = weights["confidence_head.proj.weight"][0]    # [D]
        self.bias = weights["confidence_head.proj.bias"]            # [1]
        self.with_markov = with_markov
        temps = sampled[0] if sampled[0] is not None else [1.0] * block_size
        offsets = sampled[1] if sampled[1] is not None else [0.0] * block_size
        greedy_temps = greedy[0] if greedy[0] is not None else temps
        greedy_offsets = greedy[1] if greedy[1] is not None else offsets
        # row 0: sampled requests, row 1: greedy ones
        self.temperatures = torch.tensor([temps, greedy_temps], dtype=torch.float32, device=self.weight.device)
        self.offsets = torch.tensor([offsets, greedy_offsets], dtype=torch.float32, device=self.weight.device)

    def __call__(self, hidden: torch.Tensor, prev_features: torch.Tensor | None, greedy: torch.Tensor
                 ) -> torch.Tensor:
        """hidden [R, L, H], prev_features [R, L, r] (W1 of the previous tokens), greedy [R] bool
        (which scaling each row's request takes) -> c [R, L] fp32."""
        x = torch.cat([hidden, prev_features.to(hidden.dtype)], dim=-1) if self.with_markov else hidden
        z = (x @ self.weight + self.bias).float()
        L = z.shape[1]
        row = greedy.long().to(z.device)
        return torch.sigmoid(z / self.temperatures[row, :L] + self.offsets[row, :L])
