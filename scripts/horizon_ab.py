"""What Algorithm 1's horizon saves (engine/prefix_scheduler.py, `AdmissionHorizon`): the same
method with drafts ended at the horizon and with whole blocks, plus `ar`, each concurrency level
served by all three in turn. The draft backoff is off, so every round drafts and the two DSpark
engines make the same rounds (the horizon is exact): their per-round times compare directly.

    python scripts/horizon_ab.py --prompts mixed.jsonl --concurrency 1,4,16 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from engine.api import RoundReport
from engine.bench import BenchSettings, chat_ids
from engine.bench_batch import serve_closed_loop
from engine.build import DTYPES, build_engine
from engine.config import EMBEDDED_MODEL
from engine.loading import load_target
from engine.prompts import load_first_turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--method", default="dspark-scheduled")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = BenchSettings(model=EMBEDDED_MODEL, methods=[args.method], max_new_tokens=args.max_new_tokens,
                             dtype=args.dtype)
    target = load_target(settings.model, DTYPES[args.dtype])
    prompts = [chat_ids(target.tokenizer, p) for p in load_first_turns(args.prompts, None)]
    engines = {}
    for variant, method in (("horizon", args.method), ("whole", args.method), ("ar", "ar")):
        engine = build_engine(settings.engine_config(method, max(levels), 2048), target)
        engine.backoff = None
        if variant == "whole":
            engine.schedule.horizon = lambda seqs, caps: None
        engines[variant] = engine
    for c in levels:
        batch = [prompts[i % len(prompts)] for i in range(max(c, len(prompts)))]
        for variant, engine in engines.items():
            reports: list[RoundReport] = []
            run = serve_closed_loop(engine, batch, c, settings, reports)
            full = [r for r in reports if r.batch_size == c]
            ms = {k: statistics.median(getattr(r, f"{k}_seconds") for r in full) * 1e3
                  for k in ("draft", "verify", "round")}
            print(f"c={c:<3} {variant:8s} {run['tokens_per_s']:6.1f} tokens/s, tau {run['tau'] or 1:.2f}, "
                  f"{len(reports)} rounds; medians at batch {c}: draft {ms['draft']:.1f} ms, "
                  f"verify {ms['verify']:.1f} ms, round {ms['round']:.1f} ms", flush=True)

if __name__ == "__main__":
    main()
