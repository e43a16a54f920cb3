"""How many of each request's draft tokens to verify this round (the `Schedule` of spec_round).

`full_block` (in spec_round) verifies everything; `threshold_schedule` is DSpark's static baseline
(reference §4.3 step 3): truncate each proposal at the first position whose conditional confidence
c_k falls below a threshold (per position, not the running product, as the DeepSpec evaluator does).
"""

from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.drafters.base import Proposal
from engine.sequence import Sequence
from engine.spec_round import Schedule, full_block


def threshold_schedule(threshold: float) -> Schedule:
    def schedule(seqs: list[Sequence], proposal: Proposal, caps: list[int]) -> tuple[list[int], float]:
        budgets, expected = [], 0.0
        for r, cap in enumerate(caps):
            length = min(len(proposal.tokens[r]), cap)
            conf = proposal.confidence[r]
            if conf is not None:
                below = (conf[:length] < threshold).nonzero()
                if len(below):
                    length = int(below[0])
                # expected accepted drafts: the sum of prefix survival probabilities
                expected += float(torch.cumprod(conf[:length].double(), 0).sum())
            budgets.append(length)
        return budgets, expected
    return schedule


def build_schedule(config: EngineConfig) -> Schedule:
    return threshold_schedule(config.confidence_threshold) if config.confidence_threshold > 0 else full_block
