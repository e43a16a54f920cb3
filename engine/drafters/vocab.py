"""The tokens a drafter proposes from: the target's whole vocabulary, or a frequent subset widened,
round by round, by the tokens of the requests being drafted.

A deviation from DeepSpec (reference §2.2: "the vocab is full"), after FR-Spec (Zhao et al., 2025)
and EAGLE-3's draft vocabulary: the draft logits are computed over the `d2t` subset only. On a CPU
the LM head is the drafter's largest cost: SmolLM2's 49,152 x 576 fp32 matrix takes 6.2 ms for one
row and 11 ms for seven (one thread), 1.4 / 2.1 ms over 16,384 rows (docs/training.md). EAGLE-3
pays it once per drafted token.

A fixed subset misses what a request copies from its own context: identifiers of the code to
complete, the names in a word problem. Measured on the target's greedy replies to HumanEval, MBPP,
GSM8K and MT-Bench (3 prompts each), the 16,384 most frequent tokens of the training cache cover
93 / 94 / 94 / 89% of the tokens it emits, and 99.3 / 98.6 / 99.7 / 95.7% once each request's
prompt and output so far are added. So each round the subset is the frequent one plus the drafted
requests' own tokens outside it (`cover`); their rows of the LM head and the Markov head's W2 are
gathered per round, a few hundred rows at most.

Output stays lossless whatever the subset: greedy verification compares with the target's argmax
over its full vocabulary, and under sampling q is zero outside the subset, which the rule
min(1, p/q) and the residual max(0, p - q) already handle.
"""

from __future__ import annotations

import torch

from engine.model import TargetModel
from engine.sequence import Sequence
from kernels.ops import LinearWeight, linear, pack_linear


NONE = torch.empty(0, dtype=torch.long)


class DraftVocab:
    def __init__(self, projection: LinearWeight, lm_head: torch.Tensor, ids: torch.Tensor | None):
        """projection: the LM head's rows for `ids` in the kernel's layout; lm_head: the full [V, H]
        matrix; ids: the frequent subset's target token ids (strictly increasing, checked by the
        checkpoint loader), or None for the whole vocabulary."""
        self.projection, self.lm_head, self.ids = projection, lm_head, ids
        self.vocab_size = lm_head.shape[0]
        self.frequent = None
        if ids is not None:
            self.frequent = torch.zeros(self.vocab_size, dtype=torch.bool)
            self.frequent[ids.cpu()] = True
        # Host copies for mapping a sampled index back to a token: no device sync per token.
        self._ids_host = None if ids is None else ids.tolist()
        self._extra_host: list[int] = []
        # This round: the drafted requests' context tokens outside the frequent subset (sorted), and
        # which of them each row must not propose (another request's), or None for a single row.
        self.extra = NONE.to(lm_head.device)
        self.foreign: torch.Tensor | None = None
        # This round's context-token rows of each full matrix projected through (the LM head, the
        # Markov head's W2), gathered once: EAGLE-3 and the Markov sampler project once per slot.
        self._gathered: dict[int, LinearWeight] = {}
        self._seen: dict[str, int] = {}              # request -> tokens of it looked at so far
        self._outside: dict[str, torch.Tensor] = {}  # request -> its tokens outside the frequent subset

    @classmethod
    def for_target(cls, target: TargetModel, ids: torch.Tensor | None) -> DraftVocab:
        if ids is None:
            return cls(target.vocab_projection, target.lm_head, None)
        ids = ids.to(target.device)
        return cls(pack_linear(target.lm_head[ids].contiguous()), target.lm_head, ids)

    # ---- the round's subset ----------------------------------------------------------------
    def cover(self, seqs: list[Sequence]) -> None:
        """This round's subset: the frequent one plus the drafted requests' own context tokens
        outside it. Each row may propose only its own, so the tokens a request can draft do not
        depend on what it is batched with. Vectorised over the batch: only the tokens committed
        since a request's last round are looked at."""
        if self.ids is None:
            return
        new, owner = [], []
        for r, seq in enumerate(seqs):
            seen = self._seen.get(seq.request_id, 0)
            new += seq.tokens[seen:]
            owner += [r] * (len(seq.tokens) - seen)
            self._seen[seq.request_id] = len(seq.tokens)
        if new:
            tokens, owner = torch.tensor(new, dtype=torch.long), torch.tensor(owner)
            outside = ~self.frequent[tokens]
            tokens, owner = tokens[outside], owner[outside]
            for r in owner.unique().tolist():
                rid = seqs[r].request_id
                self._outside[rid] = torch.cat([self._outside.get(rid, NONE), tokens[owner == r]]).unique()
        parts = [self._outside.get(seq.request_id, NONE) for seq in seqs]
        extra, column = torch.cat(parts).unique(return_inverse=True)
        own = torch.zeros(len(seqs), len(extra), dtype=torch.bool)
        own[torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([len(p) for p in parts])), column] = True
        device = self.lm_head.device
        self._extra_host = extra.tolist()
        self._gathered = {}
        self.extra = extra.to(device)
        self.foreign = None if len(seqs) == 1 else (~own).to(device)

    def release(self, seq: Sequence) -> None:
        self._seen.pop(seq.request_id, None)
        self._outside.pop(seq.request_id, None)

    # ---- products over the subset ----------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [R, ..., subset] of post-norm hidden states, -inf where a row may not propose."""
        logits = self.project(hidden, self.projection, self.lm_head).float()
        if self.foreign is not None and len(self.extra):
            n = len(self.ids)
            shape = (len(self.foreign),) + (1,) * (logits.dim() - 2) + (len(self.extra),)
            logits[..., n:] = logits[..., n:].masked_fill(self.foreign.view(shape), float("-inf"))
        return logits

    def project(self, x: torch.Tensor, frequent_rows: LinearWeight, full: torch.Tensor) -> torch.Tensor:
        """x [..., in] times the subset's rows of full [V, in]: the frequent ones through their
        prepared layout, this round's context tokens gathered."""
        out = linear(x, frequent_rows)
        if len(self.extra) == 0:
            return out
        rows = self._gathered.get(id(full))   # the matrices live as long as the drafter
        if rows is None:
            rows = self._gathered[id(full)] = LinearWeight(full[self.extra].t())
        return torch.cat([out, linear(x, rows)], dim=-1)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The frequent subset's rows of a [V, ...] matrix indexed by output token."""
        return weight if self.ids is None else weight[self.ids]

    # ---- back to the target's vocabulary ---------------------------------------------------
    def token(self, index: int) -> int:
        """Target token id of a subset index."""
        if self._ids_host is None:
            return index
        n = len(self._ids_host)
        return self._ids_host[index] if index < n else self._extra_host[index - n]

    def spread(self, q: torch.Tensor, out: torch.Tensor) -> None:
        """Write a distribution q over the subset into out [V] (zero outside it)."""
        if self.ids is None:
            out.copy_(q)
            return
        n = len(self.ids)
        out.zero_()
        out[self.ids] = q[:n]
        out[self.extra] = q[n:]
