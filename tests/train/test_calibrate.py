"""Sequential Temperature Scaling (with and without offsets) on synthetic rounds whose confidences
are over-confident or shifted."""

from __future__ import annotations

import math

import pytest
import torch

from engine.calibration import calibration_metrics
from engine.train.calibrate import chat_prompts, default_prompts
from engine.train.sts import Round, Scaling, predictions, rounds_from_records, sequential_scaling

ZEROS = [0.0] * 4
IDENTITY = Scaling.identity(4)


def alone(rounds: list[Round]) -> list[list[Round]]:
    """Each round a request of its own: h is 0 throughout, the history term has nothing to read."""
    return [[r] for r in rounds]


def synthetic_rounds(n: int = 3000, block: int = 4, seed: int = 0, scale: float = 3.0, shift: float = 0.0,
                     draft_share: float = 0.0) -> list[Round]:
    """True conditional acceptance sigmoid(x + draft_share * d); the head reports logit scale * x + shift
    and the draft its log-odds d, independent of x."""
    g = torch.Generator().manual_seed(seed)
    rounds = []
    for _ in range(n):
        x = torch.randn(block, generator=g) * 1.5 + 0.8
        d = torch.randn(block, generator=g) * 2.0
        accepted_each = torch.rand(block, generator=g) < torch.sigmoid(x + draft_share * d)
        accepted = 0
        while accepted < block and bool(accepted_each[accepted]):
            accepted += 1
        rounds.append(Round([scale * float(v) + shift for v in x], d.tolist(), accepted))
    return rounds


def test_sts_lowers_ece_and_keeps_auroc():
    rounds = alone(synthetic_rounds())
    scaling = sequential_scaling(rounds, 4, temperature_only=True)
    assert scaling.offsets == ZEROS and scaling.draft_weights == ZEROS
    before = calibration_metrics(predictions(rounds, IDENTITY))
    after = calibration_metrics(predictions(rounds, scaling))
    assert abs(scaling.temperatures[0] - 3.0) < 0.6      # position 1 recovers the scale it was given
    for b, a in zip(before, after):
        assert a["ece"] < 0.5 * b["ece"]
        assert a["brier"] < b["brier"]
    assert abs(after[0]["auroc"] - before[0]["auroc"]) < 1e-9   # monotone: a position's own ranking is kept
    assert all(a["auroc"] > 0.7 for a in after)


def test_offsets_fix_a_shifted_head_that_temperature_cannot():
    # Sure of acceptance by +2 logits everywhere: no temperature moves a logit across 0.
    rounds = alone(synthetic_rounds(scale=1.0, shift=2.0))
    t_only = calibration_metrics(predictions(rounds, sequential_scaling(rounds, 4, temperature_only=True)))
    scaling = sequential_scaling(rounds, 4)
    both = calibration_metrics(predictions(rounds, scaling))
    # recovers the shift it was given; the draft's log-odds carry nothing here, so their weight stays ~0
    assert abs(scaling.offsets[0] + 2.0) < 0.3 and abs(scaling.temperatures[0] - 1.0) < 0.25
    assert all(abs(w) < 0.1 for w in scaling.draft_weights)
    # 3,000 rounds: the true scaling itself scores ~0.03 (finite-sample noise of a 20-bin ECE)
    assert both[0]["ece"] < 0.04 and t_only[0]["ece"] > 0.1
    assert all(b["ece"] <= t["ece"] + 1e-12 for b, t in zip(both, t_only))
    # T and b are a monotone map of z: the ranking is kept; the small weight fitted on noise moves it a hair
    monotone = calibration_metrics(predictions(rounds, Scaling(scaling.temperatures, scaling.offsets, ZEROS)))
    assert abs(monotone[0]["auroc"] - t_only[0]["auroc"]) < 1e-9
    assert abs(both[0]["auroc"] - t_only[0]["auroc"]) < 2e-3


def test_draft_weights_add_what_the_drafts_own_certainty_knows():
    rounds = alone(synthetic_rounds(scale=2.0, draft_share=0.5))
    pair = sequential_scaling(rounds, 4, temperature_only=False)
    assert all(abs(w - 0.5) < 0.15 for w in pair.draft_weights[:2])     # recovers the share it was given
    assert abs(pair.temperatures[0] - 2.0) < 0.4 and abs(pair.offsets[0]) < 0.3
    without = Scaling(pair.temperatures, pair.offsets, ZEROS)
    with_u, without_u = (calibration_metrics(predictions(rounds, s)) for s in (pair, without))
    assert with_u[0]["auroc"] > without_u[0]["auroc"] + 0.05 and with_u[0]["brier"] < without_u[0]["brier"]
    assert with_u[0]["ece"] < 0.04


def test_a_position_separated_by_the_drafts_certainty_keeps_finite_moderate_parameters():
    """Position 2 is accepted in 8 rounds of 3,000, exactly those whose draft log-odds exceed 6:
    the log loss alone has no minimum (w -> inf); the priors keep b and w in a sane range while the
    fit still ranks those rounds first."""
    g = torch.Generator().manual_seed(3)
    rounds = []
    for n in range(3000):
        d = [float(torch.randn(1, generator=g)) * 1.5, 7.0 if n < 8 else float(torch.randn(1, generator=g))]
        rounds.append(Round([float(torch.randn(1, generator=g)), float(torch.randn(1, generator=g))], d,
                            2 if n < 8 else 1))
    scaling = sequential_scaling(alone(rounds), 2)
    assert abs(scaling.offsets[1]) <= 12 and 0.5 < scaling.draft_weights[1] < 3
    after = calibration_metrics(predictions(alone(rounds), scaling))
    assert after[1]["auroc"] > 0.99


def test_a_history_weight_learns_what_a_requests_own_earlier_rounds_say():
    """Each request has a shift s of its own (as prompt kinds do) that the head does not see:
    acceptance at position 1 is sigmoid(x + s) while the head reports x. Its earlier rounds reveal
    s, so the history weight is positive and predictions on requests never fitted on improve."""
    def requests(seed: int, n: int = 120, per_request: int = 40) -> list[list[Round]]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            shift = 2.0 * (float(torch.rand(1, generator=g)) - 0.5) * 2     # s in [-2, 2]
            x = torch.randn(per_request, generator=g) - 0.5
            accepted = torch.rand(per_request, generator=g) < torch.sigmoid(x + shift)
            out.append([Round([float(v), 0.0], [0.0, 0.0], int(a)) for v, a in zip(x, accepted)])
        return out

    fit, held_out = requests(0), requests(1)
    scaling = sequential_scaling(fit, 2)
    assert scaling.history_weights[0] > 0.5 and 0.2 < scaling.history_prior < 0.8
    without = Scaling(scaling.temperatures, scaling.offsets, scaling.draft_weights)
    with_h, without_h = (calibration_metrics(predictions(held_out, s))[0] for s in (scaling, without))
    assert with_h["brier"] < without_h["brier"] - 0.01 and with_h["auroc"] > without_h["auroc"] + 0.03
    # a request's first round has no history: its prediction is the history-free one
    first = [r[:1] for r in held_out]
    assert predictions(first, scaling) == predictions(first, without)


def test_history_is_the_requests_smoothed_calibration_error_so_far():
    from engine.drafters.confidence import HISTORY_PSEUDO_ROUNDS as A
    rounds = [Round([1.0], [0.0], 1), Round([0.0], [0.0], 0), Round([-1.0, 2.0], [0.0, 0.0], 2)]
    scaling = Scaling([1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.5, 0.25], 0.4)
    c1, c2 = 1 / (1 + math.exp(-1.0)), 0.5

    def logit(p):
        return math.log(p / (1 - p))
    h = [0.0, logit((1 + A * 0.4) / (1 + A)) - logit((c1 + A * 0.4) / (1 + A)),
         logit((1 + A * 0.4) / (2 + A)) - logit((c1 + c2 + A * 0.4) / (2 + A))]
    assert scaling.histories([rounds]) == [pytest.approx(h)]
    samples = predictions([rounds], scaling)
    last_c1 = 1 / (1 + math.exp(-(-1.0 + 0.5 * h[2])))
    assert samples[-1][1] == pytest.approx(last_c1 / (1 + math.exp(-(2.0 + 0.25 * h[2]))))


def test_engine_records_become_rounds():
    rounds = [Round([1.5, -0.5, 2.0], [0.1, 0.2, 0.3], 1), Round([0.3], [-1.0], 0)]
    scaling = Scaling([2.0, 0.5, 1.0, 1.0], [0.25, -1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0])
    samples = predictions([rounds], scaling)             # what the engine records with this scaling
    inputs = [(z, u) for r in rounds for z, u in zip(r.logits, r.draft)]
    assert rounds_from_records(samples, inputs) == rounds
    assert math.isclose(samples[1][1], 1 / (1 + math.exp(-(0.75 + 0.25 + 0.05))) / (1 + math.exp(2.0)))
    with pytest.raises(ValueError, match="head inputs"):
        rounds_from_records(samples, inputs[:-1])


def test_default_prompts_take_held_out_code_unseen_word_problems_and_general_requests_in_turn():
    import json

    from tests.conftest import EVAL_DIR

    from engine.train.data import function_prompts, general_prompts, math_prompts

    prompts = default_prompts(9, seed=0)
    train, held_out = function_prompts()
    assert len(prompts) == 9 and prompts[0::3] == held_out[:3]
    assert not set(prompts) & set(train) and not set(prompts[1::3]) & set(math_prompts(400, 42))
    assert prompts[2::3] == chat_prompts()[:3]
    pool = default_prompts(1000, seed=0)
    assert len(pool) == 3 * len(held_out) and len(set(pool)) == len(pool)
    # the general requests are neither training requests nor evaluation prompts
    evaluation = {json.loads(line)["turns"][0] for f in EVAL_DIR.glob("*.jsonl") for line in f.open()}
    assert evaluation and not set(chat_prompts()) & (set(general_prompts(0)) | set(general_prompts(42)) | evaluation)


def test_a_limit_past_the_pool_takes_the_pool_at_once():
    """--limit 100000000 drew as many word problems (half an hour, gigabytes) before decoding the 177
    prompts the pool holds; a smaller limit is the same prefix."""
    import time

    start = time.monotonic()
    pool = default_prompts(10**9, seed=2)
    assert pool == default_prompts(177, seed=2) and pool[:10] == default_prompts(10, seed=2)
    assert time.monotonic() - start < 60
