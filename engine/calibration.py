"""Confidence calibration during decoding (reference §4.5).

Per round and per verified draft position k, the prediction is the running product
prod_{i<=k} c_i of the drafter's conditional confidences and the label is whether the prefix
1..k was accepted. Per position: ECE over 20 equal-width bins, AUROC (exact, by ranks) and Brier,
and the ECE a perfectly calibrated head would show on the same predictions and sample size (its
floor): ECE is biased upwards on finite samples (a calibrated head with c_1 around 0.3 measures
~2.7% on 1,888 rounds, ~1.3% on 8,000), so an ECE near its floor says the sample cannot tell the
head from a calibrated one.
"""

from __future__ import annotations

import torch

from engine.api import RequestStats

ECE_BINS = 20


def record(stats: RequestStats, confidence: torch.Tensor | None, inputs: torch.Tensor | None, verified: int,
           accepted: int) -> None:
    """Append (position, prediction, label) for each verified position of one round, and the head's
    raw inputs there (`inputs` [len, 2], when the drafter gives them) for calibration."""
    if confidence is None or verified == 0:
        return
    survival = torch.cumprod(confidence[:verified].double(), 0).tolist()
    stats.confidence_samples.extend((k, p, accepted > k) for k, p in enumerate(survival))
    if inputs is not None:
        stats.confidence_inputs.extend(tuple(x) for x in inputs[:verified].tolist())


def tally_positions(reached: list[int], accepted_at: list[int], verified: int, accepted: int) -> None:
    """One round's draft positions: k counts as reached when it was verified with every earlier
    draft accepted, and as accepted when it was accepted too. The lists grow to `verified`."""
    while len(reached) < verified:
        reached.append(0)
        accepted_at.append(0)
    for k in range(min(verified, accepted + 1)):
        reached[k] += 1
        accepted_at[k] += int(accepted > k)


def calibration_metrics(samples: list[tuple[int, float, bool]]) -> list[dict]:
    """One row per draft position: n, mean prediction, acceptance rate, ECE, AUROC (None when a
    position saw only one label), Brier."""
    by_position: dict[int, list[tuple[float, bool]]] = {}
    for k, p, y in samples:
        by_position.setdefault(k, []).append((p, y))
    rows = []
    for k in sorted(by_position):
        p = torch.tensor([s[0] for s in by_position[k]], dtype=torch.float64)
        y = torch.tensor([float(s[1]) for s in by_position[k]], dtype=torch.float64)
        rows.append({"position": k + 1, "n": len(p), "mean_confidence": float(p.mean()),
                     "accept_rate": float(y.mean()), "ece": ece(p, y), "ece_floor": ece_floor(p),
                     "auroc": auroc(p, y), "brier": float(((p - y) ** 2).mean())})
    return rows


def ece(p: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """sum over bins of |bin| / n * |mean prediction - accuracy|; bin b holds p in [b/bins, (b+1)/bins)."""
    return float(ece_rows(p[None], y, bins)[0])


def ece_floor(p: torch.Tensor, trials: int = 64, seed: int = 0) -> float:
    """Median ECE of a perfectly calibrated head with predictions p [n]: labels drawn as Bernoulli(p)."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand((trials, len(p)), generator=g, dtype=torch.float64) < p[None]).double()
    return float(ece_rows(p[None].expand(trials, -1), y).median())


def ece_rows(p: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """ECE of each row of predictions p [G, n] against labels y [n] (one vector for every row: a
    calibration grid at once) or [G, n] (a row each): per bin, |bin| / n * |mean p - mean y| =
    |sum p - sum y| / n."""
    index = (p * bins).long().clamp(0, bins - 1) + bins * torch.arange(p.shape[0])[:, None]
    diff = torch.zeros(p.shape[0] * bins, dtype=torch.float64)
    diff.index_add_(0, index.flatten(), (p - y).double().flatten())
    return diff.view(p.shape[0], bins).abs().sum(1) / p.shape[1]


def auroc(p: torch.Tensor, y: torch.Tensor) -> float | None:
    """P(prediction of a positive > that of a negative), ties counted half (Mann-Whitney U)."""
    pos, neg = p[y > 0.5], p[y <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
