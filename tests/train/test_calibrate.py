"""Sequential Temperature Scaling on synthetic rounds whose confidences are over-confident."""

from __future__ import annotations

import math

import torch

from engine.calibration import calibration_metrics
from engine.train.calibrate import Round, predictions, rounds_from_samples, sequential_temperature_scaling


def synthetic_rounds(n: int = 3000, block: int = 4, seed: int = 0) -> list[Round]:
    """True conditional acceptance sigmoid(u); the drafter reports logit 3u (far too sure)."""
    g = torch.Generator().manual_seed(seed)
    rounds = []
    for _ in range(n):
        u = torch.randn(block, generator=g) * 1.5 + 0.8
        accepted_each = torch.rand(block, generator=g) < torch.sigmoid(u)
        accepted = 0
        while accepted < block and bool(accepted_each[accepted]):
            accepted += 1
        rounds.append(Round([3.0 * float(x) for x in u], accepted))
    return rounds


def test_sts_lowers_ece_and_keeps_auroc():
    rounds = synthetic_rounds()
    temps = sequential_temperature_scaling(rounds, 4)
    before = calibration_metrics(predictions(rounds, [1.0] * 4))
    after = calibration_metrics(predictions(rounds, temps))
    assert abs(temps[0] - 3.0) < 0.6                     # position 1 recovers the scale it was given
    for b, a in zip(before, after):
        assert a["ece"] < 0.5 * b["ece"]
        assert a["brier"] < b["brier"]
    assert abs(after[0]["auroc"] - before[0]["auroc"]) < 1e-9   # monotone: a position's own ranking is kept
    assert all(a["auroc"] > 0.7 for a in after)


def test_engine_records_are_turned_back_into_raw_logits():
    rounds = [Round([1.5, -0.5, 2.0], 1), Round([0.3], 0)]
    temps = [2.0, 0.5, 1.0, 1.0]
    samples = predictions(rounds, temps)                 # what the engine records with these temperatures
    back = rounds_from_samples(samples, temps)
    assert [r.accepted for r in back] == [1, 0]
    for r, b in zip(rounds, back):
        assert [round(z, 9) for z in b.logits] == [round(z, 9) for z in r.logits]
    assert math.isclose(samples[1][1], 1 / (1 + math.exp(-0.75)) / (1 + math.exp(1.0)))
