"""Serving benchmark: many users at once through continuous batching (paper Figures 7-8).

For each concurrency c, c requests start together; the engine batches them into one target forward
per round. Reported per method and c: aggregate tokens/s, median per-user tokens/s, tau, and the
mean verification budget per request (draft tokens verified per request per round).
"""

from __future__ import annotations

import statistics
import time
import uuid

from engine.api import GenerationRequest, GenerationResult, SamplingParams
from engine.bench import ENGINE_METHODS, BenchSettings, chat_ids
from engine.build import DTYPES, build_engine
from engine.loading import load_target


def serve_once(engine, prompt_ids: list[list[int]], settings: BenchSettings) -> dict:
    start = time.perf_counter()
    finished: dict[str, tuple[GenerationResult, float]] = {}
    for i, ids in enumerate(prompt_ids):
        sampling = SamplingParams(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens,
                                  seed=settings.seed + i)
        engine.add(GenerationRequest(uuid.uuid4().hex, tuple(ids), sampling))
    budgets: list[float] = []
    while engine.has_work:
        events, report = engine.step()
        now = time.perf_counter()
        for event in events:
            if isinstance(event, GenerationResult):
                finished[event.request_id] = (event, now)
        if report is not None:
            budgets.append(sum(report.budgets) / report.batch_size)
    wall = time.perf_counter() - start
    results = [r for r, _ in finished.values()]
    out_tokens = sum(len(r.output_ids) for r in results)
    rounds = sum(r.stats.rounds for r in results)
    accepted = sum(r.stats.accepted_tokens for r in results)
    return {
        "tokens_per_s": out_tokens / wall,
        "per_user_tokens_per_s": statistics.median(len(r.output_ids) / (t - start) for r, t in finished.values()),
        "tau": (accepted + rounds) / rounds if rounds else None,
        "mean_budget": statistics.fmean(budgets) if budgets else 0.0,
        "output_tokens": out_tokens,
        "wall_s": wall,
    }


def run_serving_bench(settings: BenchSettings, prompts: list[str], concurrencies: list[int],
                      progress=print) -> dict:
    unknown = [m for m in settings.methods if m not in ENGINE_METHODS]
    if unknown:
        raise ValueError(f"--concurrency supports the methods {', '.join(ENGINE_METHODS)}; not {', '.join(unknown)}")
    target = load_target(settings.model, DTYPES[settings.dtype])
    engines = {name: build_engine(settings.engine_config(name, max(concurrencies), 2048), target)
               for name in settings.methods}
    ids = [chat_ids(target.tokenizer, p) for p in prompts]
    for engine in engines.values():  # warm-up
        serve_once(engine, ids[:1], BenchSettings(**{**settings.__dict__, "max_new_tokens": 4}))
    rows = []
    for c in concurrencies:
        batch = [ids[i % len(ids)] for i in range(c)]
        for name in settings.methods:
            row = {"method": name, "concurrency": c, **serve_once(engines[name], batch, settings)}
            rows.append(row)
            progress(f"c={c:<3} {name:<17} {row['tokens_per_s']:7.2f} tok/s aggregate, "
                     f"{row['per_user_tokens_per_s']:6.2f} per user, tau {row['tau'] or 0:.2f}, "
                     f"budget {row['mean_budget']:.2f}")
    return {"model": target.model_id, "dtype": settings.dtype, "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature, "n_prompts": len(prompts), "rows": rows}
