"""Sequential Temperature Scaling (paper §3.2.1, reference §4.5), with an offset and a second input.

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

import json
import math
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.api import GenerationRequest, SamplingParams
from engine.calibration import calibration_metrics, ece_rows
from engine.drafters.confidence import ConfidenceHistory
from engine.engine import Engine

GRID = [round(math.exp(x), 4) for x in torch.linspace(math.log(0.05), math.log(20.0), 241).tolist()]
# The word problems of default_prompts are drawn with this seed (plus --seed); training uses --seed.
CALIBRATION_SEED = 1_000_003
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


def collect(engine: Engine, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int
            ) -> list[list[Round]]:
    """Decode the prompts (batched as the engine allows) and return each request's rounds, in the
    order they were decoded (requests in the order they finished)."""
    rounds: list[list[Round]] = []
    # Unseeded requests, whose acceptance is what the node's clients mostly see (a seed takes the
    # position-coupled draws, engine/sampling.py); their generators seeded from seed + i all the same.
    requests = [GenerationRequest(uuid.uuid4().hex, tuple(p), SamplingParams(
        temperature=temperature, max_new_tokens=max_new_tokens)) for p in prompts]
    for i, r in enumerate(requests):
        engine.rng.seed(seed + i)
        engine.add(r)
    done = 0
    while done < len(requests):
        events, _ = engine.step()
        for event in events:
            if hasattr(event, "finish_reason"):
                done += 1
                rounds.append(rounds_from_records(event.stats.confidence_samples, event.stats.confidence_inputs))
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


# General requests for calibration only, written for it (neither in the training recipe nor from
# shared/eval): without them the pool held code requests and word problems alone, and the scaling
# fitted on it was over-confident at position 1 on chat and stub-shaped code (4.0% ECE on the four
# benchmark sets at T=1, 1.6% with these; docs/benchmarks.md).
CHAT_TASKS = [
    "Write a friendly email inviting my neighbours to a {t} workshop next Saturday.",
    "Pretend you are a museum guide and introduce an exhibition about {t}.",
    "Give me a short outline for a talk on {t}, with three main points.",
    "Summarise the pros and cons of {t} in a table.",
    "I am confused about {t}. Can you explain it with an everyday analogy?",
    "Write a four-line poem about {t}.",
    "List common mistakes people make with {t} and how to avoid them.",
    "Draft a product description for an app that helps with {t}.",
]
CHAT_TOPICS = ["beekeeping", "tide pools", "sourdough baking", "chess openings", "solar eclipses", "hiking safety",
               "paper recycling", "learning a second language", "houseplants", "budget travel"]
CHAT_ORDER_SEED = 7


def chat_prompts() -> list[str]:
    prompts = [task.format(t=topic) for topic in CHAT_TOPICS for task in CHAT_TASKS]
    random.Random(CHAT_ORDER_SEED).shuffle(prompts)
    return prompts


def default_prompts(limit: int, seed: int) -> list[str]:
    """Held-out prompts of three kinds, in turn: the recipe's held-out 'write a function' requests,
    arithmetic word problems drawn with a seed the recipe never trains with, and general requests
    written for calibration (the calibration is only as good as its coverage of what the node will
    serve: fitted on code alone, position 1 was off by 16% on GSM8K; without general requests, by
    4% on the benchmark sets). 59 of each: 177 in all."""
    from engine.train.data import function_prompts, math_prompts

    code, chat = function_prompts()[1], chat_prompts()
    # no more word problems than the other kinds can pair (the first n draws are the same for any
    # count): --limit 100000000 drew them all, for half an hour, before decoding the 177 there are
    math_ = math_prompts(min(limit, len(code), len(chat)), CALIBRATION_SEED + seed)
    mixed = [p for kinds in zip(code, math_, chat) for p in kinds]
    return mixed[:limit]


def split_holdout(prompts: list, holdout: float) -> tuple[list, list]:
    """(fitting prompts, held-out prompts): every round(1 / holdout)-th prompt is held out, so that
    prompt kinds given in turn (default_prompts) are held out alike; none when holdout is 0."""
    if holdout == 0:
        return list(prompts), []
    every = round(1 / holdout)
    held = [p for i, p in enumerate(prompts) if i % every == every - 1]
    if not held or len(held) == len(prompts):
        raise ValueError(f"--holdout {holdout} leaves no prompt to fit on or none to report on "
                         f"among {len(prompts)}: use more prompts (--limit) or another fraction")
    return [p for i, p in enumerate(prompts) if i % every != every - 1], held


def calibrate_drafter(drafter: Path, model: str, prompts: list[str] | None, limit: int, max_new_tokens: int,
                      temperature: float, seed: int, write: bool = True, temperature_only: bool = False,
                      device: str = "cpu", holdout: float = 0.0, prompt_source: dict | None = None) -> dict:
    """Decode held-out prompts with the drafter, fit the per-position scaling, store it (and the
    report) in its config.json. With `holdout` > 0 that share of the prompts is decoded apart and
    never fitted on, and the before/after report is measured on it (on the fitting set, ECE after
    a fit is optimistic). `prompt_source` says where given `prompts` came from (recorded with the
    fit, so a calibration on an evaluation set shows; the default pool records itself)."""
    from engine.bench import chat_ids
    from engine.build import build_engine
    from engine.config import EngineConfig
    from engine.drafters.checkpoint import CheckpointError

    drafter = Path(drafter)
    config_file = drafter / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{drafter}: no config.json (a DeepSpec drafter directory is expected)")
    if write:
        check_storable(config_file)
    engine = build_engine(EngineConfig(model=model, method="dspark", drafter=str(drafter), max_batch=16,
                                       max_context=2048, device=device))
    c = engine.drafter.config
    if not c.enable_confidence_head:
        raise CheckpointError(f"{drafter} has no confidence head: nothing to calibrate")
    # At T=0 the greedy triple is fitted (engine/drafters/confidence.py); "before" is the triple
    # the drafter applied to these requests, as its confidence head resolved it.
    greedy = temperature == 0
    head = engine.drafter.confidence
    prior = head.history_priors[int(greedy)]
    current = Scaling(*(v[int(greedy)].tolist() for v in (head.temperatures, head.offsets, head.draft_weights)),
                      head.history_weights[int(greedy)].tolist() if prior is not None else None, prior)
    if prompts is None:
        prompts = default_prompts(limit, seed)
        prompt_source = {"pool": "engine/train/calibrate.py default_prompts: held-out code requests, word problems "
                                  f"drawn with seed {CALIBRATION_SEED + seed}, general requests for calibration only"}
    tok = engine.tokenizer
    ids = [chat_ids(tok, p) for p in prompts[:limit]]
    fit_ids, report_ids = split_holdout(ids, holdout)
    requests = collect(engine, fit_ids, max_new_tokens, temperature, seed)
    rounds = sum(map(len, requests))
    if not rounds:
        raise ValueError("the held-out decoding produced no drafting rounds")
    fitted = sequential_scaling(requests, c.block, temperature_only)
    # seeds continue past the fitting prompts', so that no two requests share one
    held_out = collect(engine, report_ids, max_new_tokens, temperature, seed + len(fit_ids)) if report_ids else []
    if report_ids and not any(held_out):
        raise ValueError("the held-out prompts produced no drafting rounds to report on")
    result = report(held_out or requests, current, fitted)
    result |= {"fit_rounds": rounds, "reported_on": "held-out" if report_ids else "fitting set",
               "held_out_prompts": len(report_ids)}
    if write:
        raw = json.loads(config_file.read_text())
        suffix = "_greedy" if greedy else ""
        raw["confidence_temperatures" + suffix] = fitted.temperatures
        raw["confidence_offsets" + suffix] = fitted.offsets
        raw["confidence_draft_weights" + suffix] = fitted.draft_weights
        for name, value in (("confidence_history_weights", fitted.history_weights),
                            ("confidence_history_prior", fitted.history_prior)):
            if value is None:
                raw.pop(name + suffix, None)
            else:
                raw[name + suffix] = value
        raw["calibration" + suffix] = {
            "method": "STS" if temperature_only else "STS with offsets, draft and history weights", "rounds": rounds,
            "temperature": temperature, "max_new_tokens": max_new_tokens, "prompts": len(fit_ids),
            "prompt_source": prompt_source or {},
            "reported_on": result["reported_on"], "held_out_prompts": len(report_ids),
            "ece_before": [round(r["ece"], 4) for r in result["before"]],
            "ece_after": [round(r["ece"], 4) for r in result["after"]]}
        store_config(config_file, raw)
    return result


def store_config(config_file: Path, raw: dict) -> None:
    """Replace the drafter's config.json whole (a write cut short leaves the old one)."""
    tmp = config_file.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(raw, indent=2, sort_keys=True))
        tmp.replace(config_file)
    except OSError as exc:
        if tmp.is_file():
            tmp.unlink()
        raise cannot_store(config_file, exc) from exc


def check_storable(config_file: Path) -> None:
    """Write and remove the file `store_config` writes first: a directory that cannot take it is refused
    before minutes of decoding, not after them."""
    tmp = config_file.with_suffix(".tmp")
    try:
        tmp.write_text("")
        tmp.unlink()
    except OSError as exc:
        raise cannot_store(config_file, exc) from exc


def cannot_store(config_file: Path, exc: OSError) -> Exception:
    from engine.drafters.checkpoint import CheckpointError

    return CheckpointError(f"cannot store the fit in {config_file}: {exc}; fix that, or report only with --dry-run")
