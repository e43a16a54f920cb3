"""Serving benchmark: many users at once through continuous batching (paper Figures 7-8).

For each concurrency c, c closed-loop users share the engine: c requests start together and each
time one finishes the next prompt joins, until every prompt (at least c of them) has been served,
so requests join and leave between rounds as in a live node and a level measures more than one
wave. Reported per method and c: aggregate tokens/s, median per-user tokens/s (a request's tokens
over its time from joining to finishing), tau, the mean verification budget per request (draft
tokens verified per request per round), and the latencies a serving benchmark reports (as vLLM's
does): time to first token (median and p90, from joining, queueing included) and time per output
token after the first (median over requests).

This box's speed drifts by 10-20% within minutes, so one pass per method says little about a 5%
difference. With `repeats` > 1 the methods run that many times at each level, interleaved, the
order rotated each time so no method always runs first; a row reports the medians over its runs
and the median, over the repeats, of its speed relative to the first method's in the same repeat
(the baseline, usually `ar`).
"""

from __future__ import annotations

import statistics
import time
import uuid

from engine.api import GenerationRequest, GenerationResult, RoundReport, SamplingParams, TokenChunk
from engine.bench import ENGINE_METHODS, BenchSettings, chat_ids
from engine.build import DTYPES, build_engine
from engine.loading import device_name, load_target


def serve_closed_loop(engine, prompt_ids: list[list[int]], concurrency: int, settings: BenchSettings,
                      reports: list[RoundReport] | None = None) -> dict:
    """Serve every prompt with at most `concurrency` in flight; every round's report is appended to
    `reports` when given."""
    start = time.perf_counter()
    joined: dict[str, float] = {}
    first: dict[str, float] = {}                     # seconds from joining to the first token
    finished: list[tuple[GenerationResult, float]] = []
    queue = list(enumerate(prompt_ids))
    # The users are one client, whose requests may draft from each other's text (prompt lookup across
    # requests, engine/drafters/corpus.py), but never from the text of a copy of the same prompt
    # (when there are more users than prompts) nor of an earlier run: the n-th copy of a prompt goes
    # to the run's n-th scope.
    run_id, copies = uuid.uuid4().hex, {}

    def join() -> None:
        i, ids = queue.pop(0)
        # Unseeded, as most clients send (a seed takes the position-coupled draws, engine/sampling.py);
        # the generator seeds repeat from run to run all the same.
        engine.rng.seed(settings.seed + i)
        sampling = SamplingParams(temperature=settings.temperature, max_new_tokens=settings.max_new_tokens)
        copy = copies[tuple(ids)] = copies.get(tuple(ids), -1) + 1
        request = GenerationRequest(uuid.uuid4().hex, tuple(ids), sampling, corpus_scope=f"{run_id}-{copy}")
        engine.add(request)
        joined[request.request_id] = time.perf_counter()

    while queue and len(joined) < concurrency:
        join()
    budgets: list[float] = []
    drafted = verified = 0
    while engine.has_work:
        events, report = engine.step()
        now = time.perf_counter()
        for event in events:
            if isinstance(event, TokenChunk) and event.token_ids and event.request_id not in first:
                first[event.request_id] = now - joined[event.request_id]
            if isinstance(event, GenerationResult):
                finished.append((event, now - joined[event.request_id]))
                if queue:
                    join()
        if report is not None:
            if reports is not None:
                reports.append(report)
            budgets.append(sum(report.budgets) / report.batch_size)
            drafted, verified = drafted + report.drafted, verified + report.batch_size
    wall = time.perf_counter() - start
    results = [r for r, _ in finished]
    ttft = sorted(first[r.request_id] for r in results)
    tpot = [(seconds - first[r.request_id]) / (len(r.output_ids) - 1) for r, seconds in finished
            if len(r.output_ids) > 1]
    out_tokens = sum(len(r.output_ids) for r in results)
    rounds = sum(r.stats.rounds for r in results)
    round_tokens = sum(r.stats.round_tokens for r in results)
    return {
        "requests": len(results),
        "tokens_per_s": out_tokens / wall,
        "per_user_tokens_per_s": statistics.median(len(r.output_ids) / seconds for r, seconds in finished),
        "tau": round_tokens / rounds if rounds else None,
        "mean_budget": statistics.fmean(budgets) if budgets else 0.0,
        "drafted_share": drafted / verified if verified else 0.0,
        "ttft_s": statistics.median(ttft),
        "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "tpot_s": statistics.median(tpot) if tpot else None,
        "output_tokens": out_tokens,
        "wall_s": wall,
    }


MEDIAN_FIELDS = ("tokens_per_s", "per_user_tokens_per_s", "tau", "mean_budget", "drafted_share", "ttft_s",
                 "ttft_p90_s", "tpot_s", "wall_s")


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def combine_runs(runs: list[dict], baseline: list[dict]) -> dict:
    """One row from a method's runs at one level: medians, the runs' aggregate speeds, and the
    median speed ratios to the baseline's run of the same repeat."""
    row = {**runs[0], **{k: _median([r[k] for r in runs]) for k in MEDIAN_FIELDS}}
    row["repeats"] = len(runs)
    row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    for key in ("tokens_per_s", "per_user_tokens_per_s"):
        row[f"{key}_vs_baseline"] = statistics.median(r[key] / b[key] for r, b in zip(runs, baseline))
    return row


def add_matched_throughput(rows: list[dict], baseline: str) -> None:
    """Each row's per-user speed over the baseline's at the same aggregate throughput (issue 5's figure:
    the paper's Figure 7 read at one x). The baseline's per-user speed there is interpolated linearly
    between its levels on its (aggregate, per-user) curve; None where the row's aggregate lies outside it,
    since no concurrency of the baseline was measured there."""
    curve = sorted((r["tokens_per_s"], r["per_user_tokens_per_s"]) for r in rows if r["method"] == baseline)
    for row in rows:
        x, row["per_user_vs_baseline_at_matched_throughput"] = row["tokens_per_s"], None
        for (x0, y0), (x1, y1) in zip(curve, curve[1:] or curve):
            if x0 <= x <= x1:
                # (1 - t) y0 + t y1 is exact at both ends: on its own curve the baseline reads 1.0
                t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
                at = (1 - t) * y0 + t * y1
                row["per_user_vs_baseline_at_matched_throughput"] = row["per_user_tokens_per_s"] / at
                break


def run_serving_bench(settings: BenchSettings, prompts: list[str], concurrencies: list[int],
                      progress=print, repeats: int = 1) -> dict:
    unknown = [m for m in settings.methods if m not in ENGINE_METHODS]
    if unknown:
        raise ValueError(f"--concurrency supports the methods {', '.join(ENGINE_METHODS)}; not {', '.join(unknown)}")
    if len(set(settings.methods)) < len(settings.methods):
        raise ValueError(f"each method once, please (--methods {','.join(settings.methods)}); "
                         "--repeats runs them several times")
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    target = load_target(settings.model, DTYPES[settings.dtype], settings.device)
    engines = {name: build_engine(settings.engine_config(name, max(concurrencies), 2048), target)
               for name in settings.methods}
    ids = [chat_ids(target.tokenizer, p) for p in prompts]
    for engine in engines.values():  # warm-up
        serve_closed_loop(engine, ids[:1], 1, BenchSettings(**{**settings.__dict__, "max_new_tokens": 4}))
    methods, rows = settings.methods, []
    for c in concurrencies:
        batch = [ids[i % len(ids)] for i in range(max(c, len(ids)))]
        runs: dict[str, list[dict]] = {name: [] for name in methods}
        for rep in range(repeats):
            for name in methods[rep % len(methods):] + methods[:rep % len(methods)]:
                run = serve_closed_loop(engines[name], batch, c, settings)
                runs[name].append(run)
                progress(f"c={c:<3} {name:<17} {run['tokens_per_s']:7.2f} tok/s aggregate, "
                         f"{run['per_user_tokens_per_s']:6.2f} per user, tau {run['tau'] or 0:.2f}, "
                         f"budget {run['mean_budget']:.2f}, drafted {run['drafted_share']:.0%}, "
                         f"ttft {run['ttft_s']:.2f} s" + (f" (run {rep + 1}/{repeats})" if repeats > 1 else ""))
        rows += [{"method": name, "concurrency": c, **combine_runs(runs[name], runs[methods[0]])} for name in methods]
    add_matched_throughput(rows, methods[0])
    return {"model": target.model_id, "device": device_name(settings.device), "dtype": settings.dtype,
            "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "n_prompts": len(prompts), "baseline": methods[0], "repeats": repeats, "rows": rows}
