"""The Markov head (reference §1.3) and the left-to-right block sampler (§4.3 step 2).

The parallel backbone gives base logits U_k for every slot at once; the head adds a transition bias
that depends on the previous token, so slot k is sampled only after slot k-1:
    vanilla: bias_k = W2 W1[x_{k-1}]
    gated:   g = sigmoid(gate([h_k ; W1[x_{k-1}]])),  bias_k = W2 (g * W1[x_{k-1}])
    rnn:     (g, c, o) = joint([s_{k-1} ; W1[x_{k-1}] ; h_k]),  s_k = sig(g) s_{k-1} + (1 - sig(g)) tanh(c),
             bias_k = W2 tanh(o),  s_{-1} = 0
with x_{-1} the anchor. The corrected logits define the draft distribution q used in verification.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from engine.drafters.vocab import DraftVocab
from engine.sampling import sample_coupled, sample_from, target_distributions
from engine.sequence import Sequence
from kernels.ops import pack_linear


LOGODDS_LIMIT = math.log((1 - 1e-6) / 1e-6)


class MarkovHead:
    def __init__(self, kind: str, weights: dict[str, torch.Tensor], vocab: DraftVocab):
        self.kind = kind
        self.w1 = weights["markov_head.markov_w1.weight"]          # [V, r], indexed by the previous token
        # [V, r] (its rows for the draft vocabulary's frequent subset); its one-row product per slot is the sampler's
        # sequential part, and the kernel's [r, V] copy runs it in 0.36 ms instead of 1.7 (SmolLM2,
        # rank 64, 2 threads).
        self.vocab, self.w2_full = vocab, weights["markov_head.markov_w2.weight"]
        self.w2 = pack_linear(vocab.rows(self.w2_full).contiguous())
        self.rank = self.w1.shape[1]
        if kind == "gated":
            self.gate_w, self.gate_b = weights["markov_head.gate_proj.weight"], weights["markov_head.gate_proj.bias"]
        elif kind == "rnn":
            self.joint_w = weights["markov_head.joint_proj.weight"]
            self.joint_b = weights["markov_head.joint_proj.bias"]

    def prev_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """W1[x_{k-1}]: [..., r]."""
        return self.w1[tokens]

    def initial_state(self, rows: int) -> torch.Tensor | None:
        return self.w1.new_zeros(rows, self.rank) if self.kind == "rnn" else None

    def step_bias(self, hidden: torch.Tensor, prev: torch.Tensor, state: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [R, H] (h_k), prev [R] token ids -> (bias [R, V_draft] fp32, next RNN state)."""
        e = self.prev_features(prev)
        if self.kind == "vanilla":
            z = e
        elif self.kind == "gated":
            gate = torch.sigmoid(torch.cat([hidden, e], dim=-1) @ self.gate_w.t() + self.gate_b)
            z = gate * e
        else:
            g, c, o = (torch.cat([state, e, hidden], dim=-1) @ self.joint_w.t() + self.joint_b).chunk(3, dim=-1)
            keep = torch.sigmoid(g)
            state = keep * state + (1 - keep) * torch.tanh(c)
            z = torch.tanh(o)
        return self.vocab.project(z, self.w2, self.w2_full).float(), state


def sample_block(base_logits: torch.Tensor, hidden: torch.Tensor, anchors: torch.Tensor,
                 head: MarkovHead | None, seqs: list[Sequence], length: int, vocab: DraftVocab,
                 with_logodds: bool = False,
                 after_slot: Callable[[int, torch.Tensor, torch.Tensor | None], bool] | None = None
                 ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor | None]:
    """Sample up to `length` draft tokens per row, left to right.

    base_logits [R, B, V_draft] fp32 over `vocab`, hidden [R, B, H] (post-norm h_k), anchors [R].
    Returns target token ids [R, L]; per row, q [L, V] over the target's vocabulary (None for
    greedy rows: q is one-hot); and, with `with_logodds`, the log-odds [R, L] fp32 that the draft's
    own distribution (its corrected logits at temperature 1) gives its likeliest token at each slot
    (a greedy row's drafted token), the confidence head's second input
    (engine/drafters/confidence.py). Each row samples with its own request's temperature / top_p
    and generator, or with a seeded request's position noise (`sample_step`). `after_slot(k,
    previous tokens [R], log-odds [R] or None)` is called after slot k (0-based; the previous tokens
    are the anchors for k = 0) and ends the block there when it returns False, so L <= length.
    """
    R = base_logits.shape[0]
    tokens = torch.empty((R, length), dtype=torch.long)
    probs = new_probs(seqs, length, vocab.vocab_size, base_logits.device)
    logodds = torch.empty((R, length), dtype=torch.float32, device=base_logits.device) if with_logodds else None
    prev, state, drafted = anchors, None if head is None else head.initial_state(R), length
    for k in range(length):
        logits = base_logits[:, k]
        if head is not None:
            bias, state = head.step_bias(hidden[:, k], prev, state)
            logits = logits + bias
        top = logits.argmax(dim=-1) if logodds is not None else None
        sample_step(logits, seqs, tokens[:, k], probs, k, vocab, top)
        if logodds is not None:
            # The draft's certainty in its likeliest token, not in the token it sampled: for a greedy
            # row the two are the same, and a sampled row's confidence must not depend on its own
            # draft (paper Appendix A), or the scheduler's verifying it would prefer the drafts q
            # likes and bias the output toward them.
            # Per slot: over all slots at once after the loop (one [R, L, V] pass) measured slower at
            # 16 rows, the copy leaving the cache. This costs ~1 ms of a 7-9 ms batch-1 propose here, 1-3 ms
            # of ~26 ms at 16 rows (SmolLM2, 16k draft vocabulary, 2 threads).
            logodds[:, k] = token_logodds(logits, top)
        if after_slot is not None and not after_slot(k, prev, None if logodds is None else logodds[:, k]):
            drafted = k + 1
            break
        prev = tokens[:, k].to(anchors.device)
    return (tokens[:, :drafted], [None if p is None else p[:drafted] for p in probs],
            None if logodds is None else logodds[:, :drafted])


def token_logodds(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = softmax(logits)[index] per row, logits [R, V] fp32, index [R]: the
    token's logit minus the log-sum-exp of the others (exact for p near 1, where log p does not
    resolve 1 - p in fp32), held within log-odds of 1e-6 and 1 - 1e-6."""
    chosen = logits.gather(1, index[:, None])
    others = logits.scatter(1, index[:, None], float("-inf")).logsumexp(dim=-1)
    return (chosen[:, 0] - others).clamp(-LOGODDS_LIMIT, LOGODDS_LIMIT)


def new_probs(seqs: list[Sequence], length: int, vocab: int, device: torch.device) -> list[torch.Tensor | None]:
    return [None if s.request.sampling.greedy else torch.empty(length, vocab, device=device) for s in seqs]


def sample_step(logits: torch.Tensor, seqs: list[Sequence], out: torch.Tensor,
                probs: list[torch.Tensor | None], k: int, vocab: DraftVocab, top: torch.Tensor | None = None) -> None:
    """Sample one slot for every row from logits [R, V_draft] over `vocab`: argmax for greedy rows
    (`top` [R] when the caller has it already), otherwise from q = the request's temperature /
    top-p distribution, recorded as probs[r][k]. Writes the target token ids to out [R].
    The greedy rows' argmax comes to the host in one copy and the sampled rows' q are computed
    together: per row, that was a GPU sync (argmax) or a dozen launches (q), for every slot."""
    greedy = [r for r, seq in enumerate(seqs) if seq.request.sampling.greedy]
    sampled = [r for r, seq in enumerate(seqs) if not seq.request.sampling.greedy]
    if greedy:
        indices = top[greedy] if top is not None else logits[greedy].max(dim=-1).indices
        for r, index in zip(greedy, indices.tolist()):
            out[r] = vocab.token(index)
    if sampled:
        qs = target_distributions([(logits[r:r + 1], seqs[r].request.sampling) for r in sampled])
        for r, q in zip(sampled, qs):
            vocab.spread(q[0], probs[r][k])
            seed = seqs[r].request.sampling.seed
            # A seeded request's draft for output position t takes the noise the target's draw for t
            # will take (engine/sampling.py), over q spread on the target's vocabulary.
            out[r] = (vocab.token(sample_from(q[0], seqs[r].generator)) if seed is None
                      else sample_coupled(probs[r][k], seed, len(seqs[r].output_ids) + k))
