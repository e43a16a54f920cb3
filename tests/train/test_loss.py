"""The DeepSpec losses on cases small enough to compute by hand."""

from __future__ import annotations

import math

import pytest
import torch

from engine.train.loss import dspark_loss, eagle3_loss, l1_distance, position_weights


def test_position_weights_decay_and_stop_at_the_first_invalid_slot():
    w = position_weights(torch.tensor([[True, True, False, True]]))
    assert w[0].tolist() == pytest.approx([1.0, math.exp(-0.25), 0.0, 0.0])


def test_three_terms_by_hand():
    # one block of two slots over a 2-token vocabulary
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])       # p_d = (.5, .5) and (.75, .25)
    p_t = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    labels = torch.tensor([[0, 1]])
    conf = torch.tensor([[0.0, 2.0]])
    parts = dspark_loss(logits, p_t, labels, conf, torch.tensor([[True, True]]))
    w = [1.0, math.exp(-0.25)]
    ce = [math.log(2), -math.log(0.25)]
    l1 = [1.0, 0.5]                                                    # |.5-1|+|.5-0|, |.75-.5|+|.25-.5|
    c_star = [0.5, 0.75]
    bce = [-(c * math.log(s) + (1 - c) * math.log(1 - s)) for c, s in zip(c_star, [0.5, 1 / (1 + math.exp(-2))])]

    def mean(xs):
        return sum(a * b for a, b in zip(w, xs)) / sum(w)

    assert parts.ce == pytest.approx(mean(ce), rel=1e-5)
    assert parts.l1 == pytest.approx(mean(l1), rel=1e-5)
    assert parts.conf == pytest.approx(mean(bce), rel=1e-5)
    assert float(parts.total) == pytest.approx(0.1 * mean(ce) + 0.9 * mean(l1) + mean(bce), rel=1e-5)
    assert parts.accept == pytest.approx(c_star)
    dflash = dspark_loss(logits, p_t, labels, None, torch.tensor([[True, True]]), ce_only=True)
    assert float(dflash.total) == pytest.approx(mean(ce), rel=1e-5)


def test_masked_slots_do_not_count():
    logits = torch.randn(3, 4, 5)
    p_t = torch.softmax(torch.randn(3, 4, 5), -1)
    labels = torch.randint(0, 5, (3, 4))
    mask = torch.tensor([[True] * 4, [True, False, True, True], [False] * 4])
    full = dspark_loss(logits, p_t, labels, torch.zeros(3, 4), mask)
    changed = logits.clone()
    changed[1, 1:] += 100 * torch.randn(3, 5)                         # behind the first invalid slot
    changed[2] += 100 * torch.randn(4, 5)                             # a dummy block
    assert float(dspark_loss(changed, p_t, labels, torch.zeros(3, 4), mask).total) == pytest.approx(float(full.total))


def test_support_coarsens_to_top_k_plus_rest():
    p_d = torch.tensor([0.5, 0.3, 0.2])
    p_t = torch.tensor([0.6, 0.1, 0.3])
    assert float(l1_distance(p_d, p_t, torch.ones(3, dtype=torch.bool))) == pytest.approx(0.4)
    # p_t known on token 0 only: |.5-.6| + |(.3+.2) - (.1+.3)| = 0.2, a lower bound of the true 0.4
    known = torch.tensor([0.6, 0.0, 0.0])
    assert float(l1_distance(p_d, known, torch.tensor([True, False, False]))) == pytest.approx(0.2)


def test_eagle3_soft_ce_with_step_decay():
    logits = [torch.zeros(2, 2), torch.zeros(1, 2)]                   # uniform: soft CE = log 2
    targets = [torch.tensor([[1.0, 0.0], [0.5, 0.5]]), torch.tensor([[0.2, 0.8]])]
    masks = [torch.tensor([True, False]), torch.tensor([True])]
    parts = eagle3_loss(logits, targets, masks)
    assert float(parts.total) == pytest.approx(math.log(2) * (1 + 0.8), rel=1e-6)
    assert parts.accept == pytest.approx([0.5, 0.7])                 # 1 - TV to (1, 0), to (.2, .8)


def test_outside_column_is_exact_when_every_outside_token_is_sampled():
    from engine.train.blocks import outside_sample, with_outside

    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 50, generator=g) * 3
    vocab = torch.tensor([2, 7, 11, 40])
    negatives, log_scale = outside_sample(vocab, 50, 1000, g)
    assert log_scale == 0.0 and sorted(negatives.tolist()) == [v for v in range(50) if v not in vocab.tolist()]
    q = with_outside(full[:, torch.cat([vocab, negatives])], len(vocab), log_scale).softmax(-1)
    exact = full.softmax(-1)
    torch.testing.assert_close(q[:, :4], exact[:, vocab])
    torch.testing.assert_close(q[:, 4], 1 - exact[:, vocab].sum(-1))
    # A sample of the outside scales its exp-sum by |outside| / M: unbiased over draws.
    estimates = []
    for _ in range(400):
        negatives, log_scale = outside_sample(vocab, 50, 10, g)
        estimates.append(with_outside(full[:1, torch.cat([vocab, negatives])], 4, log_scale)[0, 4].exp())
    true_rest = full[0, [v for v in range(50) if v not in vocab.tolist()]].exp().sum()
    assert abs(float(torch.stack(estimates).mean() / true_rest) - 1) < 0.15
