"""The benchmark harness: every method on the same prompts in one process, interleaved.

Machines here are noisy (shared cores), so methods run A B C A B C prompt by prompt, each after a
warm-up, and the report gives medians over prompts and each method's ratio to the peers.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.api import GenerationRequest, SamplingParams
from engine.calibration import calibration_metrics
from engine.build import DTYPES, build_engine
from engine.config import LOOKUP_MIN_MATCH, METHODS, WITHOUT_MODEL_DRAFTER, EngineConfig
from engine.drafters.init import KINDS
from engine.loading import LoadedTarget, device_name, load_target
from engine.peers import HfPeer

PEERS = {"hf-greedy": None, "hf-pld": 7}


class BenchMethod(NamedTuple):
    """What a bench method name runs: an engine method, its scheduler, a confidence threshold
    (None: --confidence-threshold, or `threshold_unset` without it) and prompt lookup in front of the
    drafter (--lookup-min-match, or `lookup_unset` without it)."""
    engine: str
    scheduler: str = "static"
    threshold: float | None = None
    threshold_unset: float = 0.0
    lookup_unset: int = 0


# The plain method names verify every proposed token (or up to --confidence-threshold).
ENGINE_METHODS = {m: BenchMethod(m) for m in METHODS} | {
    "dspark-fixed": BenchMethod("dspark", threshold=0.0),
    "dspark-threshold": BenchMethod("dspark", threshold_unset=0.5),
    "dspark-scheduled": BenchMethod("dspark", "sync", 0.0),
    "dspark-async": BenchMethod("dspark", "async", 0.0),
    "dspark-lookup": BenchMethod("dspark", threshold=0.0, lookup_unset=LOOKUP_MIN_MATCH),
    "dspark-lookup-scheduled": BenchMethod("dspark", "sync", 0.0, lookup_unset=LOOKUP_MIN_MATCH),
}


@dataclass
class MethodRun:
    method: str
    tokens_per_s: list[float] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    rounds: int = 0
    round_tokens: int = 0
    reached: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    confidence_samples: list[tuple[int, float, bool]] = field(default_factory=list)

    def add_stats(self, stats) -> None:
        self.confidence_samples.extend(stats.confidence_samples)
        self.rounds += stats.rounds
        self.round_tokens += stats.round_tokens
        for k, (r, a) in enumerate(zip(stats.reached, stats.accepted_at)):
            if k == len(self.reached):
                self.reached.append(0)
                self.accepted_at.append(0)
            self.reached[k] += r
            self.accepted_at[k] += a


@dataclass
class BenchSettings:
    model: str
    methods: list[str]
    max_new_tokens: int
    dtype: str
    temperature: float = 0.0
    drafter: str | None = None
    drafters: dict[str, str] = field(default_factory=dict)   # per-method drafter, over `drafter`
    block_size: int = 7
    confidence_threshold: float = 0.0
    lookup_min_match: int = 0
    seed: int = 0
    device: str = "cpu"

    def drafter_for(self, method: str) -> str | None:
        return self.drafters.get(method, self.drafter)

    def engine_config(self, name: str, max_batch: int, max_context: int) -> EngineConfig:
        """The engine a bench method name stands for (ENGINE_METHODS)."""
        m = ENGINE_METHODS[name]
        threshold = m.threshold if m.threshold is not None else self.confidence_threshold or m.threshold_unset
        lookup = 0 if m.engine in WITHOUT_MODEL_DRAFTER else self.lookup_min_match or m.lookup_unset
        return EngineConfig(model=self.model, method=m.engine, drafter=self.drafter_for(m.engine), dtype=self.dtype,
                            block_size=self.block_size, scheduler=m.scheduler, confidence_threshold=threshold,
                            lookup_min_match=lookup, max_batch=max_batch, max_context=max_context,
                            device=self.device)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def _runner(method: str, settings: BenchSettings, target: LoadedTarget):
    """A callable prompt_ids -> (output ids, stats or None)."""
    if method in PEERS:
        peer = HfPeer(target.path, DTYPES[settings.dtype], PEERS[method], settings.device)
        return lambda ids, n: (peer.generate(ids, n, target.eos_token_ids), None)
    engine = build_engine(settings.engine_config(method, 1, max(4096, settings.max_new_tokens + 2048)), target)

    def run(ids: list[int], n: int):
        # Unseeded, as most clients send: a seed would take the position-coupled draws (engine/sampling.py).
        # The same generator seed for every prompt and method, as before that existed.
        engine.rng.seed(settings.seed)
        sampling = SamplingParams(temperature=settings.temperature, max_new_tokens=n)
        result = engine.generate(GenerationRequest(uuid.uuid4().hex, tuple(ids), sampling))
        return list(result.output_ids), result.stats
    return run


def run_bench(settings: BenchSettings, prompts: list[str], progress=print) -> dict:
    for method in settings.methods:
        if method not in ENGINE_METHODS and method not in PEERS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join((*ENGINE_METHODS, *PEERS))}")
        if method in PEERS and settings.temperature > 0:
            raise ValueError(f"{method} is a greedy peer; use --temperature 0 or drop it")
    target = load_target(settings.model, DTYPES[settings.dtype], settings.device)
    runners = {m: _runner(m, settings, target) for m in settings.methods}
    runs = {m: MethodRun(m) for m in settings.methods}
    prompt_ids = [chat_ids(target.tokenizer, p) for p in prompts]
    for m, run in runners.items():  # warm-up: first calls pay one-time allocation and dispatch costs
        run(prompt_ids[0], 8)
    for i, ids in enumerate(prompt_ids):
        order = settings.methods[i % len(settings.methods):] + settings.methods[:i % len(settings.methods)]
        for m in order:
            start = time.perf_counter()
            out, stats = runners[m](ids, settings.max_new_tokens)
            elapsed = time.perf_counter() - start
            runs[m].tokens_per_s.append(len(out) / elapsed)
            runs[m].outputs.append(out)
            if stats is not None:
                runs[m].add_stats(stats)
        progress(f"prompt {i + 1}/{len(prompt_ids)}: " + "  ".join(
            f"{m} {runs[m].tokens_per_s[-1]:.1f} tok/s" for m in settings.methods))
    reference = "ar" if "ar" in runs else next((m for m in settings.methods if m in PEERS), None)
    results = []
    for m, run in runs.items():
        exact = None
        if settings.temperature == 0 and reference is not None:
            same = [a == b for a, b in zip(run.outputs, runs[reference].outputs)]
            exact = sum(same) / len(same)
        results.append({
            "method": m,
            "tokens_per_s": statistics.median(run.tokens_per_s),
            "tau": run.round_tokens / run.rounds if run.rounds else None,
            "per_position_acceptance": [a / r if r else 0.0 for a, r in zip(run.accepted_at, run.reached)],
            # per draft position: ECE / AUROC / Brier of the running confidence product (DSpark only)
            "calibration": calibration_metrics(run.confidence_samples) if run.confidence_samples else None,
            "exact_match": exact,
            "output_tokens": sum(map(len, run.outputs)),
        })
    base = {m: statistics.median(runs[m].tokens_per_s) for m in PEERS if m in runs}
    for row in results:
        row["speedup"] = {f"vs_{b}": row["tokens_per_s"] / v for b, v in base.items() if v > 0}
    return {
        "model": target.model_id, "device": device_name(settings.device),
        "dtype": settings.dtype, "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
        "block_size": settings.block_size, "n_prompts": len(prompts), "exact_match_reference": reference,
        "drafters": {m: settings.drafter_for(ENGINE_METHODS[m].engine) for m in settings.methods
                     if m in ENGINE_METHODS and ENGINE_METHODS[m].engine in KINDS},
        "results": results,
    }


def format_table(report: dict) -> str:
    lines = [f"{report['model']} on {report['device']} ({report['dtype']}), {report['n_prompts']} prompts, "
             f"{report['max_new_tokens']} new tokens, T={report['temperature']}",
             f"{'method':<18}{'tok/s':>8}{'tau':>7}{'exact':>7}  speedup  per-position acceptance"]
    for r in report["results"]:
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        exact = f"{r['exact_match']:.2f}" if r["exact_match"] is not None else "-"
        speed = " ".join(f"{k[3:]} {v:.2f}x" for k, v in r["speedup"].items())
        acc = " ".join(f"{a:.2f}" for a in r["per_position_acceptance"])
        lines.append(f"{r['method']:<18}{r['tokens_per_s']:>8.2f}{tau:>7}{exact:>7}  {speed}  {acc}")
    return "\n".join(lines)
