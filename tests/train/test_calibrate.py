"""Sequential Temperature Scaling (with and without offsets) on synthetic rounds whose confidences
are over-confident or shifted."""

from __future__ import annotations

import math

import torch

from engine.calibration import calibration_metrics
from engine.train.calibrate import (Round, chat_prompts, default_prompts, predictions, rounds_from_samples,
                                    sequential_scaling)

ONES, ZEROS = [1.0] * 4, [0.0] * 4


def synthetic_rounds(n: int = 3000, block: int = 4, seed: int = 0, scale: float = 3.0, shift: float = 0.0
                     ) -> list[Round]:
    """True conditional acceptance sigmoid(u); the drafter reports logit scale * u + shift."""
    g = torch.Generator().manual_seed(seed)
    rounds = []
    for _ in range(n):
        u = torch.randn(block, generator=g) * 1.5 + 0.8
        accepted_each = torch.rand(block, generator=g) < torch.sigmoid(u)
        accepted = 0
        while accepted < block and bool(accepted_each[accepted]):
            accepted += 1
        rounds.append(Round([scale * float(x) + shift for x in u], accepted))
    return rounds


def test_sts_lowers_ece_and_keeps_auroc():
    rounds = synthetic_rounds()
    temps, offsets = sequential_scaling(rounds, 4, temperature_only=True)
    assert offsets == ZEROS
    before = calibration_metrics(predictions(rounds, ONES, ZEROS))
    after = calibration_metrics(predictions(rounds, temps, offsets))
    assert abs(temps[0] - 3.0) < 0.6                     # position 1 recovers the scale it was given
    for b, a in zip(before, after):
        assert a["ece"] < 0.5 * b["ece"]
        assert a["brier"] < b["brier"]
    assert abs(after[0]["auroc"] - before[0]["auroc"]) < 1e-9   # monotone: a position's own ranking is kept
    assert all(a["auroc"] > 0.7 for a in after)


def test_offsets_fix_a_shifted_head_that_temperature_cannot():
    # Sure of acceptance by +2 logits everywhere: no temperature moves a logit across 0.
    rounds = synthetic_rounds(scale=1.0, shift=2.0)
    t_only = calibration_metrics(predictions(rounds, *sequential_scaling(rounds, 4, temperature_only=True)))
    temps, offsets = sequential_scaling(rounds, 4)
    both = calibration_metrics(predictions(rounds, temps, offsets))
    assert abs(offsets[0] + 2.0) < 0.3 and abs(temps[0] - 1.0) < 0.25     # recovers the shift it was given
    # 3,000 rounds: the true scaling itself scores ~0.03 (finite-sample noise of a 20-bin ECE)
    assert both[0]["ece"] < 0.04 and t_only[0]["ece"] > 0.1
    assert all(b["ece"] <= t["ece"] + 1e-12 for b, t in zip(both, t_only))
    assert abs(both[0]["auroc"] - t_only[0]["auroc"]) < 1e-9


def test_engine_records_are_turned_back_into_raw_logits():
    rounds = [Round([1.5, -0.5, 2.0], 1), Round([0.3], 0)]
    temps, offsets = [2.0, 0.5, 1.0, 1.0], [0.25, -1.0, 0.0, 0.0]
    samples = predictions(rounds, temps, offsets)        # what the engine records with this scaling
    back = rounds_from_samples(samples, temps, offsets)
    assert [r.accepted for r in back] == [1, 0]
    for r, b in zip(rounds, back):
        assert [round(z, 9) for z in b.logits] == [round(z, 9) for z in r.logits]
    assert math.isclose(samples[1][1], 1 / (1 + math.exp(-1.0)) / (1 + math.exp(2.0)))


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
