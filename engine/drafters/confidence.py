"""The confidence head (reference §1.4) with per-position calibration (§4.5, paper §3.2.1).

c_k = sigmoid(z_k / T_k + b_k), z_k = w . [h_k ; W1[x_{k-1}]] + b (or w . h_k without the Markov
input), the conditional probability that draft slot k is accepted given slots before it were.
x_{k-1} is the sampled draft token (the anchor for slot 0). T_k and b_k come from the checkpoint's
`confidence_temperatures` and `confidence_offsets` (calibration); they default to 1 and 0. The
paper's STS fits T_k only; b_k is our extension (engine/train/calibrate.py says why).
"""

from __future__ import annotations

import torch


class ConfidenceHead:
    def __init__(self, weights: dict[str, torch.Tensor], with_markov: bool,
                 temperatures: list[float] | None, offsets: list[float] | None, block_size: int):
        self.weight = weights["confidence_head.proj.weight"][0]    # [D]
        self.bias = weights["confidence_head.proj.bias"]            # [1]
        self.with_markov = with_markov
        temps = temperatures if temperatures is not None else [1.0] * block_size
        self.temperatures = torch.tensor(temps, dtype=torch.float32, device=self.weight.device)
        self.offsets = torch.tensor(offsets if offsets is not None else [0.0] * block_size, dtype=torch.float32,
                                    device=self.weight.device)

    def __call__(self, hidden: torch.Tensor, prev_features: torch.Tensor | None) -> torch.Tensor:
        """hidden [R, L, H], prev_features [R, L, r] (W1 of the previous tokens) -> c [R, L] fp32."""
        x = torch.cat([hidden, prev_features.to(hidden.dtype)], dim=-1) if self.with_markov else hidden
        z = (x @ self.weight + self.bias).float()
        L = z.shape[1]
        return torch.sigmoid(z / self.temperatures[:L] + self.offsets[:L])
