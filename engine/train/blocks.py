"""From one cached sequence to one loss (reference §3.2 anchors and blocks, §3.5 TTT).

The draft logits are computed over the sequence's vocabulary (the tokens it contains plus the
target's top-k at each position) and one more column, "outside": the draft's mass on every other
token, estimated from a uniform sample of them (sampled softmax: log of |outside| / M times the sum
of exp over the M sampled logits). The full vocabulary would cost ~30x more on the LM head (49k rows
for SmolLM2). Without the outside column the drafter is never taught to keep mass off the tokens it
does not see: a drafter trained that way put 85% of its probability outside the sequence's
vocabulary at inference (measured), and its sampled drafts were almost never accepted. The target's
own mass outside its top-k is one "rest" bucket in the L1 term (see loss.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.model import TargetModel
from engine.train.cache import CachedSequence
from engine.train.loss import LossParts, dspark_loss, eagle3_loss
from engine.train.modules import DSparkTrainable, Eagle3Trainable


def sample_anchors(loss_mask: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Positions i with loss_mask[i] and loss_mask[i+1]; a random `count` of them, ascending."""
    candidates = torch.nonzero(loss_mask[:-1] & loss_mask[1:]).flatten()
    if len(candidates) > count:   # the generator is a CPU one wherever the data lives (reproducible)
        candidates = candidates[torch.randperm(len(candidates), generator=generator)[:count].to(candidates.device)]
    return candidates.sort().values


OUTSIDE_SAMPLES = 2048


def sequence_vocab(seq: CachedSequence) -> torch.Tensor:
    return torch.unique(torch.cat([seq.input_ids, seq.topk_ids.flatten()]))


def outside_sample(vocab: torch.Tensor, vocab_size: int, count: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, float]:
    """`count` tokens drawn uniformly without replacement from those not in `vocab`, and log of the
    factor that scales their exp-sum to an estimate over all of them."""
    outside = torch.ones(vocab_size, dtype=torch.bool, device=vocab.device)
    outside[vocab] = False
    pool = torch.nonzero(outside).flatten()
    count = min(count, len(pool))
    picks = pool[torch.randperm(len(pool), generator=generator)[:count].to(pool.device)]
    # No token outside (a vocabulary the sequence covers): the column's exp-sum is empty, i.e. 0.
    return picks, math.log(len(pool) / count) if count else 0.0


def with_outside(logits: torch.Tensor, inside: int, log_scale: float) -> torch.Tensor:
    """[..., inside + M] logits over (vocab, sampled outside) -> [..., inside + 1]: the last column
    is the log of the estimated exp-sum over every token outside the vocabulary."""
    rest = torch.logsumexp(logits[..., inside:].float(), dim=-1, keepdim=True) + log_scale
    return torch.cat([logits[..., :inside].float(), rest], dim=-1)


def pad_outside(probs: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The target side of the outside column: no known mass there (it is part of the rest bucket)."""
    return F.pad(probs, (0, 1)), F.pad(support, (0, 1), value=False)


def target_rows(seq: CachedSequence, positions: torch.Tensor, vocab: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Target probabilities at `positions` [...] over `vocab`: (probs [..., |vocab|], support bool)."""
    cols = torch.searchsorted(vocab, seq.topk_ids[positions])
    probs = torch.zeros(*positions.shape, len(vocab), device=vocab.device)
    probs.scatter_(-1, cols, seq.topk_probs[positions])
    support = torch.zeros(*positions.shape, len(vocab), dtype=torch.bool, device=vocab.device)
    support.scatter_(-1, cols, True)
    return probs, support


def dspark_sequence_loss(model: DSparkTrainable, target: TargetModel, seq: CachedSequence, max_anchors: int,
                         generator: torch.Generator, ce_only: bool) -> LossParts | None:
    S, B = len(seq.input_ids), model.config.block
    anchors = sample_anchors(seq.loss_mask, max_anchors, generator)
    if len(anchors) == 0:
        return None
    vocab = sequence_vocab(seq)
    negatives, log_scale = outside_sample(vocab, target.lm_head.shape[0], OUTSIDE_SAMPLES, generator)
    label_pos = anchors[:, None] + torch.arange(B, device=anchors.device) + 1  # slot t predicts a + t + 1
    in_range = label_pos < S
    label_pos = label_pos.clamp_max(S - 1)
    eval_mask = in_range & seq.loss_mask[label_pos]
    labels_tok = seq.input_ids[label_pos]
    labels = torch.searchsorted(vocab, labels_tok)
    prev = torch.cat([seq.input_ids[anchors][:, None], labels_tok[:, :-1]], dim=1)
    hidden = model.block_hidden(target, seq.taps, seq.input_ids, anchors)
    logits, conf = model.heads(target, hidden, prev, torch.cat([vocab, negatives]))
    logits = with_outside(logits, len(vocab), log_scale)
    probs, support = pad_outside(*target_rows(seq, label_pos - 1, vocab))    # p_t at a + t
    return dspark_loss(logits, probs, labels, conf, eval_mask, support, ce_only=ce_only)


def eagle3_sequence_loss(model: Eagle3Trainable, target: TargetModel, seq: CachedSequence, max_len: int,
                         generator: torch.Generator) -> LossParts | None:
    """TTT over a window of the sequence (the whole of it when it fits in max_len)."""
    S = len(seq.input_ids)
    steps = model.config.block
    start = 0
    if S > max_len:
        start = int(torch.randint(0, S - max_len + 1, (1,), generator=generator))
    window = slice(start, start + min(S, max_len))
    ids, mask = seq.input_ids[window], seq.loss_mask[window]
    n_tokens = len(ids)
    if n_tokens < steps + 3 or not bool(mask.any()):
        return None
    vocab = sequence_vocab(seq)
    negatives, log_scale = outside_sample(vocab, target.lm_head.shape[0], OUTSIDE_SAMPLES, generator)
    outputs = model.ttt(target, seq.taps[window], ids, steps)
    logits, targets, masks, supports = [], [], [], []
    head = target.lm_head[torch.cat([vocab, negatives])].float()
    for s, h in enumerate(outputs):
        n = h.shape[0]
        pred_pos = torch.arange(n, device=h.device) + s + 1           # p_t here predicts token i+2+s
        valid = (pred_pos + 1 < n_tokens) & mask[(pred_pos + 1).clamp_max(n_tokens - 1)]
        probs, support = pad_outside(*target_rows(seq, pred_pos + start, vocab))
        logits.append(with_outside(h @ head.t(), len(vocab), log_scale))
        targets.append(probs)
        masks.append(valid)
        supports.append(support)
    if not any(bool(m.any()) for m in masks):
        return None
    return eagle3_loss(logits, targets, masks, supports)
