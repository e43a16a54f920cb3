"""Markov-head variants, the confidence head, threshold truncation and calibration metrics, each on a
small hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from engine.api import GenerationRequest, SamplingParams
from engine.calibration import auroc, calibration_metrics, ece, ece_floor
from engine.drafters.base import Proposal
from engine.drafters.confidence import ConfidenceHead
from engine.drafters.markov import MarkovHead, sample_block
from engine.drafters.vocab import DraftVocab
from engine.schedulers import threshold_schedule
from engine.sequence import Sequence
from kernels.ops import pack_linear

# V = 3 tokens, r = 2, H = 1
W1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]])
W2 = torch.tensor([[1.0, 1.0], [0.5, -1.0], [0.0, 3.0]])
H = torch.tensor([[0.5]])


def vocab(ids: list[int] | None = None, size: int = 3) -> DraftVocab:
    """A draft vocabulary over a V-token target (the projection is unused: logits are given)."""
    return DraftVocab(pack_linear(torch.zeros(size, 1)), torch.zeros(size, 1),
                      None if ids is None else torch.tensor(ids))


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_vanilla_bias_is_w2_w1():
    bias, _ = MarkovHead("vanilla", {"markov_head.markov_w1.weight": W1, "markov_head.markov_w2.weight": W2},
                         vocab()).step_bias(H, torch.tensor([1]), None)
    # W1[1] = (0, 2): W2 . (0, 2) = (2, -2, 6)
    assert bias.tolist() == [[2.0, -2.0, 6.0]]


def test_gated_bias_gates_w1():
    gate_w, gate_b = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), torch.tensor([0.0, 1.0])
    head = MarkovHead("gated", {"markov_head.markov_w1.weight": W1, "markov_head.markov_w2.weight": W2,
                                "markov_head.gate_proj.weight": gate_w, "markov_head.gate_proj.bias": gate_b}, vocab())
    bias, _ = head.step_bias(H, torch.tensor([2]), None)
    # input [h ; W1[2]] = (0.5, 1, -1): g = (sig(0.5), sig(-1 + 1)) = (sig(.5), .5); z = g * (1, -1)
    z = (sig(0.5), -0.5)
    want = [z[0] + z[1], 0.5 * z[0] - z[1], 3 * z[1]]
    assert torch.allclose(bias[0], torch.tensor(want))


def test_rnn_bias_and_state():
    r = 2
    joint_w = torch.zeros(3 * r, 2 * r + 1)
    joint_w[0, 0] = 1.0      # g_0 reads s_0
    joint_w[2, 2] = 1.0      # c_0 reads W1[x]_0
    joint_w[4, 4] = 2.0      # o_0 reads h
    joint_b = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0, 0.0])
    head = MarkovHead("rnn", {"markov_head.markov_w1.weight": W1, "markov_head.markov_w2.weight": W2,
                              "markov_head.joint_proj.weight": joint_w, "markov_head.joint_proj.bias": joint_b},
                      vocab())
    state = head.initial_state(1)
    bias, state = head.step_bias(H, torch.tensor([0]), state)
    # s_-1 = 0, W1[0] = (1, 0): g = (0, 0), c = (1, .5), o = (1, 0)
    s = (0.5 * math.tanh(1.0), 0.5 * math.tanh(0.5))
    assert torch.allclose(state[0], torch.tensor(s))
    o = (math.tanh(1.0), 0.0)
    assert torch.allclose(bias[0], torch.tensor([o[0], 0.5 * o[0], 0.0]))
    _, state2 = head.step_bias(H, torch.tensor([0]), state)  # the state carries: g_0 = s_0 now
    keep = sig(s[0])
    assert math.isclose(float(state2[0, 0]), keep * s[0] + (1 - keep) * math.tanh(1.0), rel_tol=1e-6)


def _seq(temperature: float, seed: int = 0, request_id: str = "r") -> Sequence:
    req = GenerationRequest(request_id, (0,), SamplingParams(temperature=temperature))
    return Sequence(request=req, generator=torch.Generator().manual_seed(seed), tokens=[0], prompt_len=1)


def test_greedy_block_follows_the_corrected_logits_left_to_right():
    # bias favours token (prev + 1) % 3 strongly; base logits favour token 0 everywhere
    w1, w2 = torch.eye(3), torch.roll(torch.eye(3), 1, dims=0) * 10
    head = MarkovHead("vanilla", {"markov_head.markov_w1.weight": w1, "markov_head.markov_w2.weight": w2}, vocab())
    base = torch.tensor([[[1.0, 0.0, 0.0]] * 4])
    tokens, probs, logodds = sample_block(base, torch.zeros(1, 4, 1), torch.tensor([1]), head, [_seq(0.0)], 4,
                                          vocab(), with_logodds=True)
    assert tokens.tolist() == [[2, 0, 1, 2]] and probs == [None]
    # slot 0 after anchor 1: corrected logits [1, 0, 10], token 2; slot 1 after 2: [11, 0, 0], token 0
    p0, p1 = math.exp(10) / (math.e + 1 + math.exp(10)), math.exp(11) / (math.exp(11) + 2)
    assert torch.allclose(logodds[0, :2], torch.tensor([math.log(p0 / (1 - p0)), math.log(p1 / (1 - p1))]))
    tokens, _, none = sample_block(base, torch.zeros(1, 4, 1), torch.tensor([1]), None, [_seq(0.0)], 4, vocab())
    assert tokens.tolist() == [[0, 0, 0, 0]] and none is None  # DFlash: every slot from its base logits


def test_sampled_q_is_the_corrected_distribution():
    w1, w2 = torch.eye(3), torch.roll(torch.eye(3), 1, dims=0)
    head = MarkovHead("vanilla", {"markov_head.markov_w1.weight": w1, "markov_head.markov_w2.weight": w2}, vocab())
    base = torch.zeros(1, 2, 3)
    tokens, probs, logodds = sample_block(base, torch.zeros(1, 2, 1), torch.tensor([0]), head, [_seq(2.0, 5)], 2,
                                          vocab(), with_logodds=True)
    for k, prev in enumerate([0, int(tokens[0, 0])]):
        want = torch.softmax(torch.roll(torch.eye(3), 1, dims=0)[:, prev] / 2.0, dim=0)
        assert torch.allclose(probs[0][k], want)
        # the log-odds are the draft's own (temperature 1) of its likeliest token, whatever the request
        # samples at and whichever token it drew (Appendix A: its confidence must not depend on that)
        p = torch.softmax(torch.roll(torch.eye(3), 1, dims=0)[:, prev], dim=0).max()
        assert torch.allclose(logodds[0, k], (p / (1 - p)).log())


def test_a_draft_vocabulary_proposes_target_ids_and_spreads_q_over_the_target_vocabulary():
    # V = 4, draft vocabulary {1, 3}: base logits and the Markov bias are over those two rows only
    w1 = torch.eye(4)
    w2 = torch.tensor([[9.0, 0, 0, 0], [0, 0, 0, 5.0], [9.0, 9, 9, 9], [0, 5.0, 0, 0]])  # rows 0, 2 unused
    sub = vocab([1, 3], size=4)
    head = MarkovHead("vanilla", {"markov_head.markov_w1.weight": w1, "markov_head.markov_w2.weight": w2}, sub)
    base = torch.zeros(1, 3, 2)
    # after 3, token 1 gets +5; after 1, token 3 gets +5; the anchor 0 biases neither
    tokens, _, _ = sample_block(base + torch.tensor([0.0, 0.1]), torch.zeros(1, 3, 1), torch.tensor([0]), head,
                             [_seq(0.0)], 3, sub)
    assert tokens.tolist() == [[3, 1, 3]]
    tokens, probs, _ = sample_block(base, torch.zeros(1, 2, 1), torch.tensor([3]), head, [_seq(1.0, 2)], 2, sub)
    want = torch.zeros(4)
    want[[1, 3]] = torch.softmax(torch.tensor([5.0, 0.0]), dim=0)
    assert torch.allclose(probs[0][0], want) and probs[0][0][[0, 2]].tolist() == [0.0, 0.0]
    assert tokens[0, 0].item() in (1, 3)


def test_a_round_widens_the_subset_by_the_drafted_requests_own_tokens():
    lm_head = torch.arange(12.0).reshape(6, 2)                # V = 6, H = 2
    v = DraftVocab(pack_linear(lm_head[[1, 3]].contiguous()), lm_head, torch.tensor([1, 3]))
    a, b = _seq(0.0, request_id="a"), _seq(0.0, request_id="b")
    a.tokens, b.tokens = [0, 5, 1], [3, 3]
    v.cover([a, b])
    assert v.extra.tolist() == [0, 5]                        # tokens 1 and 3 are in the frequent subset
    h = torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    inf = float("-inf")                                       # b may not propose a's context tokens
    assert v.logits(h).tolist() == [[(lm_head[t] @ h[0]).item() for t in (1, 3, 0, 5)],
                                    [(lm_head[t] @ h[1]).item() for t in (1, 3)] + [inf, inf]]
    assert [v.token(i) for i in range(4)] == [1, 3, 0, 5]
    out = torch.empty(6)
    v.spread(torch.tensor([0.1, 0.2, 0.3, 0.4]), out)
    assert torch.allclose(out, torch.tensor([0.3, 0.1, 0.0, 0.2, 0.0, 0.4]))
    b.tokens.append(4)                                        # only the new tokens are looked at
    v.cover([b])
    assert v.extra.tolist() == [4] and v.foreign is None      # a is not drafted this round
    v.release(b)
    v.cover([a, b])
    assert v.extra.tolist() == [0, 4, 5]                      # b starts again from its whole context
    assert v.foreign.tolist() == [[False, True, False], [True, False, True]]


def test_confidence_uses_previous_token_temperature_offset_and_draft_weight():
    w = {"confidence_head.proj.weight": torch.tensor([[1.0, 2.0, -1.0]]),
         "confidence_head.proj.bias": torch.tensor([0.5])}
    hidden = torch.tensor([[[1.0], [1.0]]])
    prev = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    u = torch.tensor([[2.0, -4.0]])                        # the draft's log-odds of its tokens
    sampled, greedy = torch.tensor([False]), torch.tensor([True])
    head = ConfidenceHead(w, with_markov=True, block_size=2, sampled=([1.0, 2.0], None, None))
    z = head.logits(hidden, prev)
    assert torch.allclose(z, torch.tensor([[1 + 0 - 1 + 0.5, 1 + 2 + 0.5]]))
    want = torch.tensor([[sig(0.5), sig(3.5 / 2)]])
    assert torch.allclose(head.scale(z, u, sampled), want)            # no draft weights: u is ignored
    assert torch.allclose(head.scale(z, u, greedy), want)             # no greedy triple: the same scaling
    head = ConfidenceHead(w, with_markov=True, block_size=2, sampled=([1.0, 2.0], [-0.25, 1.0], [0.5, 0.0]),
                          greedy=([0.5, 1.0], [0.0, -1.0], None))
    assert torch.allclose(head.scale(z, u, sampled), torch.tensor([[sig(0.5 - 0.25 + 1.0), sig(3.5 / 2 + 1.0)]]))
    assert torch.allclose(head.scale(z, u, greedy), torch.tensor([[sig(0.5 / 0.5), sig(3.5 - 1.0)]]))
    both = head.scale(z.expand(2, 2), u.expand(2, 2), torch.tensor([True, False]))   # per row
    assert torch.allclose(both[0], head.scale(z, u, greedy)[0])
    assert torch.allclose(both[1], head.scale(z, u, sampled)[0])


def test_confidence_adds_the_weighted_history_of_each_rows_triple():
    from engine.drafters.confidence import ConfidenceHistory

    w = {"confidence_head.proj.weight": torch.tensor([[1.0]]), "confidence_head.proj.bias": torch.tensor([0.0])}
    z, u = torch.tensor([[0.5, -1.0]]).expand(2, 2), torch.zeros(2, 2)
    rows = torch.tensor([False, True])           # a sampled and a greedy request
    head = ConfidenceHead(w, with_markov=False, block_size=2, sampled=(None, None, None),
                          sampled_history=([2.0, 0.5], 0.25))
    assert head.uses_history                     # no greedy triple: greedy requests take the sampled one
    record = ConfidenceHistory(rounds=10, accepted=8, predicted=3.0)
    h = head.history([record, ConfidenceHistory()], [False, True])
    assert h.tolist() == pytest.approx([record.error(0.25), 0.0]) and h[0] > 0   # accepted more than predicted
    c = head.scale(z, u, rows, history=h)
    assert torch.allclose(c[0], torch.sigmoid(torch.tensor([0.5 + 2.0 * h[0], -1.0 + 0.5 * h[0]])))
    assert torch.allclose(c[1], torch.sigmoid(torch.tensor([0.5, -1.0])))       # no history yet: h = 0
    head = ConfidenceHead(w, with_markov=False, block_size=2, greedy=([1.0, 1.0], None, None),
                          sampled_history=([2.0, 0.5], 0.25))
    assert torch.allclose(head.scale(z, u, torch.tensor([True, True]), history=h), torch.sigmoid(z))
    assert not ConfidenceHead(w, with_markov=False, block_size=2).uses_history


def test_draft_logodds_are_those_of_the_drafted_token():
    from engine.drafters.markov import token_logodds

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [50.0, -50.0, 0.0]])
    p = torch.softmax(logits, -1)
    out = token_logodds(logits, torch.tensor([0, 2, 1]))
    assert torch.allclose(out[:2], torch.stack([(p[0, 0] / (1 - p[0, 0])).log(), torch.tensor(0.5).log()]))
    assert torch.isfinite(out).all() and out[2] < -13              # p ~ 4e-44, held at 1e-6


def test_threshold_truncates_at_first_low_confidence():
    proposal = Proposal(tokens=[[1, 2, 3, 4], [5, 6, 7], [8, 9]], probs=[None] * 3,
                        confidence=[torch.tensor([0.9, 0.8, 0.3, 0.9]), torch.tensor([0.2, 0.9, 0.9]), None])
    budgets, expected = threshold_schedule(0.5)([_seq(0.0)] * 3, proposal, [4, 3, 1])
    assert budgets == [2, 0, 1]
    assert math.isclose(expected, 0.9 + 0.72, rel_tol=1e-6)  # float32 confidences


def test_calibration_metrics_on_a_small_case():
    p = torch.tensor([0.9, 0.8, 0.3, 0.1], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    # bins: 0.9 -> 18, 0.8 -> 16, 0.3 -> 6, 0.1 -> 2; each |p - y| / 4
    assert math.isclose(ece(p, y), (0.1 + 0.8 + 0.7 + 0.1) / 4)
    assert math.isclose(auroc(p, y), 3 / 4)  # positive pairs ordered right: (.9>.8), (.9>.1), (.3>.1)
    rows = calibration_metrics([(0, 0.9, True), (0, 0.8, False), (0, 0.3, True), (0, 0.1, False), (1, 0.5, True)])
    assert rows[0]["position"] == 1 and math.isclose(rows[0]["brier"], (0.01 + 0.64 + 0.49 + 0.01) / 4)
    assert rows[1]["auroc"] is None and rows[1]["n"] == 1


def test_ece_takes_the_bins_it_is_given():
    p = torch.tensor([0.9, 0.8, 0.3, 0.1], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert math.isclose(ece(p, y, bins=1), abs(2.1 - 2.0) / 4)              # one bin: |mean p - mean y|
    assert math.isclose(ece(p, y, bins=2), (abs(0.4 - 1.0) + abs(1.7 - 1.0)) / 4)   # [0, .5), [.5, 1)


def test_ece_floor_is_what_a_calibrated_head_measures_and_shrinks_with_the_sample():
    g = torch.Generator().manual_seed(3)
    small, large = (torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.1 for n in (400, 6400))
    # labels drawn from the predictions themselves: a calibrated head; its ECE scatters around the floor
    measured = sorted(ece(small, (torch.rand(400, generator=g, dtype=torch.float64) < small).double())
                      for _ in range(41))
    assert abs(measured[20] - ece_floor(small)) < 0.15 * ece_floor(small)   # medians of 41 and 64 draws
    assert 3 < ece_floor(small) / ece_floor(large) < 5          # ~ 1 / sqrt(n)
    assert ece_floor(small) == ece_floor(small)                 # seeded: the same report twice
    assert calibration_metrics([(0, 0.9, True)])[0]["ece_floor"] >= 0


def test_the_drafter_gives_greedy_requests_their_own_scaling(target, tmp_path):
    import json

    from engine.build import build_engine
    from engine.config import EngineConfig
    from tests.drafters.helpers import request, write_drafter

    path = write_drafter(target, tmp_path / "d", "dspark")
    config = json.loads((path / "config.json").read_text())
    block = config["block_size"]
    config.update(confidence_offsets=[0.0] * block, confidence_offsets_greedy=[-30.0] * block)
    (path / "config.json").write_text(json.dumps(config))
    engine = build_engine(EngineConfig(model=str(target.path), method="dspark", drafter=str(path), max_batch=2,
                                       max_context=64))
    engine.add(request([5, 6, 7, 8], max_new_tokens=8))                    # greedy
    engine.add(request([5, 6, 7, 8], temperature=1.0, max_new_tokens=8))   # sampled
    while len(engine.active) < 2:
        engine.step()
    proposal = engine.drafter.propose(engine.active)
    greedy, sampled = proposal.confidence
    assert bool((greedy < 1e-9).all()) and bool((sampled > 1e-6).all())
    # the head's raw inputs come with each row's confidences, and give them back under its scaling
    head, rows = engine.drafter.confidence, torch.stack(proposal.confidence_inputs)
    assert rows.shape == (2, block, 2) and torch.isfinite(rows).all()
    assert torch.allclose(head.scale(rows[..., 0], rows[..., 1], torch.tensor([True, False])),
                          torch.stack(proposal.confidence))
    # and the engine records them beside each verified position's prediction, for calibration
    finished = []
    while engine.active:
        finished += [e for e in engine.step()[0] if hasattr(e, "finish_reason")]
    assert len(finished) == 2
    for event in finished:
        assert len(event.stats.confidence_inputs) == len(event.stats.confidence_samples) > 0
