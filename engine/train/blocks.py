"""From one cached sequence to one loss (reference §3.2 anchors and blocks, §3.5 TTT).

The draft logits are computed over the sequence's vocabulary only: the tokens it contains plus the
target's top-k at each position. The full vocabulary would cost ~30x more on the LM head (49k rows
for SmolLM2) while the target's mass outside that set is a few percent; it is accounted for as one
"rest" bucket by the L1 term (see loss.py).
"""

from __future__ import annotations

import torch

from engine.model import TargetModel
from engine.train.cache import CachedSequence
from engine.train.loss import LossParts, dspark_loss, eagle3_loss
from engine.train.modules import DSparkTrainable, Eagle3Trainable


def sample_anchors(loss_mask: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Positions i with loss_mask[i] and loss_mask[i+1]; a random `count` of them, ascending."""
    candidates = torch.nonzero(loss_mask[:-1] & loss_mask[1:]).flatten()
    if len(candidates) > count:
        candidates = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    return candidates.sort().values


def sequence_vocab(seq: CachedSequence) -> torch.Tensor:
    return torch.unique(torch.cat([seq.input_ids, seq.topk_ids.flatten()]))


def target_rows(seq: CachedSequence, positions: torch.Tensor, vocab: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Target probabilities at `positions` [...] over `vocab`: (probs [..., |vocab|], support bool)."""
    cols = torch.searchsorted(vocab, seq.topk_ids[positions])
    probs = torch.zeros(*positions.shape, len(vocab))
    probs.scatter_(-1, cols, seq.topk_probs[positions])
    support = torch.zeros(*positions.shape, len(vocab), dtype=torch.bool)
    support.scatter_(-1, cols, True)
    return probs, support


def dspark_sequence_loss(model: DSparkTrainable, target: TargetModel, seq: CachedSequence, max_anchors: int,
                         generator: torch.Generator, ce_only: bool) -> LossParts | None:
    S, B = len(seq.input_ids), model.config.block
    anchors = sample_anchors(seq.loss_mask, max_anchors, generator)
    if len(anchors) == 0:
        return None
    vocab = sequence_vocab(seq)
    label_pos = anchors[:, None] + torch.arange(B) + 1                      # slot t predicts a + t + 1
    in_range = label_pos < S
    label_pos = label_pos.clamp_max(S - 1)
    eval_mask = in_range & seq.loss_mask[label_pos]
    labels_tok = seq.input_ids[label_pos]
    labels = torch.searchsorted(vocab, labels_tok)
    prev = torch.cat([seq.input_ids[anchors][:, None], labels_tok[:, :-1]], dim=1)
    hidden = model.block_hidden(target, seq.taps, seq.input_ids, anchors)
    logits, conf = model.heads(target, hidden, prev, vocab)
    probs, support = target_rows(seq, label_pos - 1, vocab)                  # p_t at a + t
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
    outputs = model.ttt(target, seq.taps[window], ids, steps)
    logits, targets, masks, supports = [], [], [], []
    head = target.lm_head[vocab].float()
    for s, h in enumerate(outputs):
        n = h.shape[0]
        pred_pos = torch.arange(n) + s + 1                                  # p_t here predicts token i+2+s
        valid = (pred_pos + 1 < n_tokens) & mask[(pred_pos + 1).clamp_max(n_tokens - 1)]
        probs, support = target_rows(seq, pred_pos + start, vocab)
        logits.append(h @ head.t())
        targets.append(probs)
        masks.append(valid)
        supports.append(support)
    if not any(bool(m.any()) for m in masks):
        return None
    return eagle3_loss(logits, targets, masks, supports)
