"""Sequential Temperature Scaling (paper §3.2.1, reference §4.5), with an offset and a second input.

The fit alone: engine/train/calibrate.py decodes the rounds it fits on and stores the result.

Held-out data: real decoding rounds. Per round, the drafter's raw confidence logits z_1..z_L, the
log-odds u_1..u_L that its own distribution gave its likeliest token at each slot (the drafted
one for a greedy request; engine/drafters/confidence.py says why not a sampled one), and the
number a of draft tokens accepted; the label of position k is "prefix 1..k accepted" (a >= k).
For k = 1..gamma, left to right: T_k = argmin over a grid of ECE(prod_{i<=k} sigmoid(z_i / T_i))
on the rounds that verified position k, the earlier T_i already fixed. Temperature scaling keeps
the order of the c_k, so a position's own AUROC is unchanged (that of the product may move a little).

Deviations, by default (`temperature_only=True` is the paper's method exactly: ECE, temperatures only):
- Each position also gets an offset, c_k = sigmoid(z_k / T_k + b_k) (Platt scaling, still monotone,
  so a position's AUROC is kept). A temperature cannot move a logit across 0: a head that is sure
  too often on the wrong side, as our CPU-trained drafter's is at position 1 (ECE 5.3% after
  temperature-only STS on its own fitting set), stays miscalibrated. The pair is fitted by the log
  loss of the cumulative product, not by ECE: with an offset, ECE alone is minimised by a
  near-constant prediction at the base rate (measured: T_1 = 11, every c_1 ~0.27, ECE 1.7%), which
  says nothing about which rounds will be accepted, and that is what the scheduler needs. Log loss
  rewards both calibration and resolution.
- Then a weight w_k of u_k joins them, c_k = sigmoid(z_k / T_k + b_k + w_k u_k), the three refined
  together from the grid's pair (L-BFGS on the same log loss) and kept if the loss falls. This is no
  longer a monotone map of z_k: it adds what the draft's own certainty knows. At T=0 that is much
  (a greedy draft is accepted iff it is the target's argmax; AUROC at position 1 0.75 -> 0.82 on
  held-out prompts, engine/drafters/confidence.py); at T=1 it is fitted the same way.
- Last, a weight v_k of h, the request's own calibration error at position 1 over its earlier rounds
  (engine/drafters/confidence.py, ConfidenceHistory): c_k = sigmoid(z_k / T_k + b_k + w_k u_k +
  v_k h). h compares a request's acceptance with the scaling's own c_1 at h = 0 (its prediction for
  a request with no history yet), with the fit set's position-1 acceptance rate as its prior,
  exactly as the engine computes it while decoding; so the rounds are kept per request, in the
  order they were decoded. After the pass above, the four are refined jointly per position, left
  to right, HISTORY_PASSES times, h recomputed before each pass since it moves with c_1. Held out
  at T=0, joint passes left position 1 at 1.9% ECE on the four benchmark sets where fitting v_k
  alone on the fixed triple left 2.15% (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.calibration import calibration_metrics, ece_rows
from engine.drafters.confidence import ConfidenceHistory

GRID = [round(math.exp(x), 4) for x in torch.linspace(math.log(0.05), math.log(20.0), 241).tolist()]
OFFSETS = [round(x / 10, 1) for x in range(-40, 41)]      # b_k in [-4, 4], step 0.1


@dataclass
class Round:
    logits: list[float]        # raw z_k of the verified positions
    draft: list[float]         # u_k there: the draft's log-odds of its likeliest token
    accepted: int              # draft tokens accepted


@dataclass
class Scaling:
    temperatures: list[float]
    offsets: list[float]
    draft_weights: list[float]
    history_weights: list[float] | None = None     # v_k; None: no history term
    history_prior: float | None = None             # the rate h is pulled toward, with the weights

    @classmethod
    def identity(cls, block: int) -> Scaling:
        return cls([1.0] * block, [0.0] * block, [0.0] * block)

    def logit(self, k: int, z: float, u: float, h: float = 0.0) -> float:
        x = z / self.temperatures[k] + self.offsets[k] + self.draft_weights[k] * u
        return x + self.history_weights[k] * h if self.history_weights is not None else x

    def confidence(self, k: int, z: float, u: float, h: float = 0.0) -> float:
        return sigmoid(self.logit(k, z, u, h))

    def histories(self, requests: list[list[Round]]) -> list[list[float]]:
        """h at each round of each request, as the engine computes it while decoding with this scaling
        (0 everywhere without a history term)."""
        if self.history_prior is None:
            return [[0.0] * len(rounds) for rounds in requests]
        out = []
        for rounds in requests:
            record, hs = ConfidenceHistory(), []
            for r in rounds:
                hs.append(record.error(self.history_prior))
                record.pending = self.confidence(0, r.logits[0], r.draft[0])
                record.settle(len(r.logits), r.accepted)
            out.append(hs)
        return out


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def rounds_from_records(samples: list[tuple[int, float, bool]], inputs: list[tuple[float, float]]) -> list[Round]:
    """One request's engine records (RequestStats.confidence_samples and .confidence_inputs, an
    entry per verified position) as rounds."""
    if len(inputs) != len(samples):
        raise ValueError(f"{len(samples)} confidence records but {len(inputs)} head inputs: "
                         "the drafter does not report its confidence head's inputs")
    rounds: list[Round] = []
    for (k, _, accepted), (z, u) in zip(samples, inputs):
        if k == 0:
            rounds.append(Round([], [], 0))
        rounds[-1].logits.append(z)
        rounds[-1].draft.append(u)
        rounds[-1].accepted += int(accepted)
    return rounds

def predictions(requests: list[list[Round]], scaling: Scaling) -> list[tuple[int, float, bool]]:
    """(k, prod_{i<=k} c_i, accepted > k) per verified position of each round of each request."""
    out = []
    for rounds, hs in zip(requests, scaling.histories(requests)):
        for r, h in zip(rounds, hs):
            survival = 1.0
            for k, (z, u) in enumerate(zip(r.logits, r.draft)):
                survival *= scaling.confidence(k, z, u, h)
                out.append((k, survival, r.accepted > k))
    return out


def log_loss_rows(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean log loss of each row of predictions p [G, n] against labels y [n]."""
    p = p.clamp(1e-12, 1 - 1e-12)
    return -(y[None] * p.log() + (1 - y[None]) * (1 - p).log()).mean(1)


HISTORY_PASSES = 3    # joint (T, b, w, v) passes; held out at T=0, one pass left c_1 at 2.26% ECE, three at 2.17%


def sequential_scaling(requests: list[list[Round]], block: int, temperature_only: bool = False) -> Scaling:
    """Per position left to right, with the earlier positions fixed: T_k minimising the ECE of the
    cumulative product (temperature_only, the paper's STS), or (T_k, b_k) minimising its log loss
    over the grid, then (T_k, b_k, w_k) refined from there, the identity unless strictly better;
    then (without temperature_only) the history passes. `requests`: each request's rounds in
    decoding order (h reads earlier ones)."""
    scaling = Scaling.identity(block)
    rounds = [r for request in requests for r in request]
    grid_b = torch.tensor([0.0] if temperature_only else OFFSETS, dtype=torch.float64)
    score_rows = ece_rows if temperature_only else log_loss_rows
    no_history = [0.0] * len(rounds)
    for k in range(block):
        prefix, z, u, h, labels = position_data(rounds, no_history, scaling, k)
        if not len(labels):
            continue
        best = (float(score_rows((prefix * torch.sigmoid(z))[None], labels)[0]), 1.0, 0.0, 0.0, 0.0)
        for ts in torch.tensor(GRID, dtype=torch.float64).split(8):     # 8 temperatures x all offsets at once
            t, b = torch.cartesian_prod(ts, grid_b).view(-1, 2).unbind(1)
            scores = score_rows(prefix[None] * torch.sigmoid(z[None] / t[:, None] + b[:, None]), labels)
            i = int(scores.argmin())
            if float(scores[i]) < best[0] - 1e-12:
                best = (float(scores[i]), round(float(t[i]), 4), round(float(b[i]), 1), 0.0, 0.0)
        if not temperature_only:
            best = min(best, refine(prefix, z, u, h, labels, *best[1:]))
        scaling.temperatures[k], scaling.offsets[k], scaling.draft_weights[k] = best[1:4]
    if temperature_only or not rounds:
        return scaling
    scaling.history_weights = [0.0] * block
    # kept off 0 and 1, where h's logits would be infinite
    scaling.history_prior = round(min(max(sum(r.accepted >= 1 for r in rounds) / len(rounds), 0.01), 0.99), 4)
    for _ in range(HISTORY_PASSES):
        history = [h for hs in scaling.histories(requests) for h in hs]
        for k in range(block):
            prefix, z, u, h, labels = position_data(rounds, history, scaling, k)
            if len(labels):
                _, *fitted = refine(prefix, z, u, h, labels, scaling.temperatures[k], scaling.offsets[k],
                                    scaling.draft_weights[k], scaling.history_weights[k])
                (scaling.temperatures[k], scaling.offsets[k], scaling.draft_weights[k],
                 scaling.history_weights[k]) = fitted
    return scaling


def position_data(rounds: list[Round], history: list[float], scaling: Scaling, k: int) -> tuple[torch.Tensor, ...]:
    """Over the rounds that verified position k: the survival of the earlier positions under
    `scaling`, z_k, u_k, h and the labels "prefix 1..k accepted" (float64)."""
    reached = [(r, h) for r, h in zip(rounds, history) if len(r.logits) > k]
    prefix = [math.prod(scaling.confidence(i, z, u, h) for i, (z, u) in enumerate(zip(r.logits[:k], r.draft[:k])))
              for r, h in reached]
    columns = (prefix, [r.logits[k] for r, _ in reached], [r.draft[k] for r, _ in reached], [h for _, h in reached],
               [float(r.accepted > k) for r, _ in reached])
    return tuple(torch.tensor(c, dtype=torch.float64) for c in columns)


# Gaussian priors on b_k, w_k and v_k (standard deviations, in logits): without them a late position,
# where a few accepted rounds are separated from the rest by u alone, drove the refinement to
# b = -2251, w = 6089, a step function of u (the shipped drafter's position 7, fitted on 4,657
# rounds; measured 2026-11-30). b's spread is the grid's range, w's and v's the scale of one logit.
PRIOR_SD_OFFSET, PRIOR_SD_WEIGHT = 4.0, 1.0


def refine(prefix: torch.Tensor, z: torch.Tensor, u: torch.Tensor, h: torch.Tensor, labels: torch.Tensor, t: float,
           b: float, w: float, v: float) -> tuple[float, float, float, float, float]:
    """(log loss, T, b, w, v) after L-BFGS on the log loss of prefix * sigmoid(z / T + b + w u + v h)
    from (t, b, w, v), with the priors above (the penalty of a posterior mode, per round); T stays
    positive (fitted as log 1/T). The loss returned is the log loss alone. Deterministic: float64.
    Where h is 0 throughout, only the prior acts on v, which stays at 0 from 0."""
    theta = torch.tensor([-math.log(t), b, w, v], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        p = prefix * torch.sigmoid(z * theta[0].exp() + theta[1] + theta[2] * u + theta[3] * h)
        return log_loss_rows(p[None], labels)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        prior = ((theta[1] / PRIOR_SD_OFFSET) ** 2 + (theta[2] / PRIOR_SD_WEIGHT) ** 2
                 + (theta[3] / PRIOR_SD_WEIGHT) ** 2) / 2
        value = loss() + prior / len(labels)
        value.backward()
        return value

    opt.step(closure)
    a, b, w, v = theta.detach().tolist()
    t, b, w, v = round(min(max(math.exp(-a), GRID[0]), GRID[-1]), 4), round(b, 4), round(w, 4), round(v, 4)
    with torch.no_grad():
        theta.copy_(torch.tensor([-math.log(t), b, w, v], dtype=torch.float64))
        return float(loss()), t, b, w, v


def report(requests: list[list[Round]], before: Scaling, after: Scaling) -> dict:
    return {"rounds": sum(map(len, requests)),
            "before": calibration_metrics(predictions(requests, before)),
            "after": calibration_metrics(predictions(requests, after)),
            "temperatures": after.temperatures, "offsets": after.offsets, "draft_weights": after.draft_weights,
            "history_weights": after.history_weights, "history_prior": after.history_prior}
