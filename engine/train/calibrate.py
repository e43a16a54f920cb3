"""Sequential Temperature Scaling (paper §3.2.1, reference §4.5).

Held-out data: real decoding rounds. Per round, the drafter's raw confidence logits z_1..z_L and the
number a of draft tokens accepted; the label of position k is "prefix 1..k accepted" (a >= k).
For k = 1..gamma, left to right: T_k = argmin over a grid of ECE(prod_{i<=k} sigmoid(z_i / T_i)) on
the rounds that verified position k, the earlier T_i already fixed. Temperature scaling keeps the
order of the c_k, so a position's own AUROC is unchanged (that of the product may move a little).
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.api import GenerationRequest, SamplingParams
from engine.calibration import calibration_metrics, ece
from engine.engine import Engine

GRID = [round(math.exp(x), 4) for x in torch.linspace(math.log(0.05), math.log(20.0), 241).tolist()]


@dataclass
class Round:
    logits: list[float]        # raw z_k of the verified positions
    accepted: int              # draft tokens accepted


def rounds_from_samples(samples: list[tuple[int, float, bool]], temperatures: list[float]) -> list[Round]:
    """Undo the engine's records (k, prod_{i<=k} sigmoid(z_i / T_i), accepted > k), one run per round,
    back into raw logits (the engine applied `temperatures`)."""
    rounds: list[Round] = []
    prev = 1.0
    for k, survival, accepted in samples:
        if k == 0:
            rounds.append(Round([], 0))
            prev = 1.0
        c = min(max(survival / prev if prev > 0 else 0.0, 1e-12), 1 - 1e-12)
        prev = survival
        rounds[-1].logits.append(math.log(c / (1 - c)) * temperatures[k])
        rounds[-1].accepted += int(accepted)
    return rounds


def collect(engine: Engine, prompts: list[list[int]], max_new_tokens: int, temperature: float, seed: int,
            temperatures: list[float]) -> list[Round]:
    """Decode the prompts (batched as the engine allows) and return every round's record."""
    rounds: list[Round] = []
    requests = [GenerationRequest(uuid.uuid4().hex, tuple(p), SamplingParams(
        temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + i)) for i, p in enumerate(prompts)]
    for r in requests:
        engine.add(r)
    done = 0
    while done < len(requests):
        events, _ = engine.step()
        for event in events:
            if hasattr(event, "finish_reason"):
                done += 1
                rounds.extend(rounds_from_samples(event.stats.confidence_samples, temperatures))
    return rounds


def predictions(rounds: list[Round], temperatures: list[float]) -> list[tuple[int, float, bool]]:
    """(k, prod_{i<=k} sigmoid(z_i / T_i), accepted > k) per verified position of each round."""
    out = []
    for r in rounds:
        survival = 1.0
        for k, z in enumerate(r.logits):
            survival *= 1.0 / (1.0 + math.exp(-z / temperatures[k]))
            out.append((k, survival, r.accepted > k))
    return out


def sequential_temperature_scaling(rounds: list[Round], block: int) -> list[float]:
    temps = [1.0] * block
    for k in range(block):
        reached = [r for r in rounds if len(r.logits) > k]
        if not reached:
            continue
        labels = torch.tensor([float(r.accepted > k) for r in reached], dtype=torch.float64)
        prefix = torch.tensor([math.prod(1 / (1 + math.exp(-z / t)) for z, t in zip(r.logits[:k], temps))
                               for r in reached], dtype=torch.float64)
        z = torch.tensor([r.logits[k] for r in reached], dtype=torch.float64)
        best = (ece(prefix * torch.sigmoid(z), labels), 1.0)     # T_k = 1 unless the grid does better
        for t in GRID:
            score = ece(prefix * torch.sigmoid(z / t), labels)
            if score < best[0] - 1e-12:
                best = (score, t)
        temps[k] = best[1]
    return temps


def report(rounds: list[Round], before: list[float], after: list[float]) -> dict:
    return {"rounds": len(rounds),
            "before": calibration_metrics(predictions(rounds, before)),
            "after": calibration_metrics(predictions(rounds, after)),
            "temperatures": after}


def calibrate_drafter(drafter: Path, model: str, prompts: list[str] | None, limit: int, max_new_tokens: int,
                      temperature: float, seed: int, write: bool = True) -> dict:
    """Decode held-out prompts with the drafter, fit STS, store the temperatures (and the report) in
    its config.json. Default prompts: the recipe's held-out 'write a function' requests."""
    from engine.bench import chat_ids
    from engine.build import build_engine
    from engine.config import EngineConfig
    from engine.drafters.checkpoint import CheckpointError
    from engine.train.data import function_prompts

    drafter = Path(drafter)
    config_file = drafter / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{drafter}: no config.json (a DeepSpec drafter directory is expected)")
    engine = build_engine(EngineConfig(model=model, method="dspark", drafter=str(drafter), max_batch=8,
                                       max_context=2048))
    c = engine.drafter.config
    if not c.enable_confidence_head:
        raise CheckpointError(f"{drafter} has no confidence head: nothing to calibrate")
    current = list(c.confidence_temperatures or [1.0] * c.block)
    if prompts is None:
        prompts = function_prompts()[1][:limit]
    tok = engine.tokenizer
    ids = [chat_ids(tok, p) for p in prompts[:limit]]
    rounds = collect(engine, ids, max_new_tokens, temperature, seed, current)
    if not rounds:
        raise ValueError("the held-out decoding produced no drafting rounds")
    temps = sequential_temperature_scaling(rounds, c.block)
    result = report(rounds, current, temps)
    if write:
        raw = json.loads(config_file.read_text())
        raw["confidence_temperatures"] = temps
        raw["calibration"] = {"method": "STS", "rounds": len(rounds), "temperature": temperature,
                              "max_new_tokens": max_new_tokens, "prompts": len(ids),
                              "ece_before": [round(r["ece"], 4) for r in result["before"]],
                              "ece_after": [round(r["ece"], 4) for r in result["after"]]}
        tmp = config_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw, indent=2, sort_keys=True))
        tmp.replace(config_file)
    return result
