"""The tokens a drafter proposes from: the target's whole vocabulary, or a frequent subset.

A deviation from DeepSpec (reference §2.2: "the vocab is full"), after FR-Spec (Zhao et al., 2025)
and EAGLE-3's draft vocabulary: the draft logits are computed over the `d2t` subset only. On a CPU
the LM head is the drafter's largest cost: SmolLM2's 49,152 x 576 fp32 matrix takes 6.2 ms for one
row and 11 ms for seven (one thread), 1.4 / 2.1 ms over 16,384 rows (docs/benchmarks.md). EAGLE-3
pays it once per drafted token. Output stays lossless: greedy verification compares with the
target's argmax over its full vocabulary, and under sampling q is zero outside the subset, which the
rule min(1, p/q) and the residual max(0, p - q) already handle.
"""

from __future__ import annotations

import torch

from engine.model import TargetModel
from kernels.ops import LinearWeight, linear, pack_linear


class DraftVocab:
    def __init__(self, projection: LinearWeight, vocab_size: int, ids: torch.Tensor | None):
        """projection: the LM head's rows for the draft vocabulary; vocab_size: the target's;
        ids: the subset's target token ids (strictly increasing, checked by the checkpoint loader),
        or None for the whole vocabulary."""
        self.projection, self.vocab_size, self.ids = projection, vocab_size, ids

    @classmethod
    def for_target(cls, target: TargetModel, ids: torch.Tensor | None) -> DraftVocab:
        if ids is None:
            return cls(target.vocab_projection, target.args.vocab_size, None)
        ids = ids.to(target.device)
        return cls(pack_linear(target.lm_head[ids].contiguous()), target.args.vocab_size, ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [..., draft vocabulary] of post-norm hidden states."""
        return linear(hidden, self.projection).float()

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The subset's rows of a [V, ...] matrix indexed by output token (the Markov head's W2)."""
        return weight if self.ids is None else weight[self.ids]

    def token(self, index: int) -> int:
        """Target token id of a draft-vocabulary index."""
        return index if self.ids is None else int(self.ids[index])

    def spread(self, q: torch.Tensor, out: torch.Tensor) -> None:
        """Write a distribution q over the subset into out [V] (zero outside it)."""
        if self.ids is None:
            out.copy_(q)
        else:
            out.zero_()
            out[self.ids] = q
