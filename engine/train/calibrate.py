"""Calibrate a drafter's confidence head: decode held-out prompts with it, fit the per-position
scaling on the rounds (engine/train/sts.py, paper §3.2.1) and store it in the drafter's config.json."""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path

from engine.api import GenerationRequest, SamplingParams
from engine.engine import Engine
from engine.train.sts import Round, Scaling, report, rounds_from_records, sequential_scaling

# The word problems of default_prompts are drawn with this seed (plus --seed); training uses --seed.
CALIBRATION_SEED = 1_000_003


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
