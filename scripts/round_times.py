"""Where a serving level's time goes: per method, c requests started together on a fresh engine,
the wall time and the rounds at full batch split into plain rounds and drafted ones (probes).

Methods alternate, --repeats times each, so that drift of a shared box hits them alike
(docs/benchmarks.md, "Serving"):

    OMP_NUM_THREADS=2 python scripts/round_times.py --prompts mixed.jsonl --concurrency 32 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path

import torch

from engine.api import GenerationRequest, SamplingParams
from engine.bench import BenchSettings, chat_ids
from engine.build import DTYPES, build_engine
from engine.loading import load_target
from engine.prompts import load_first_turns

DRAFTED = 0.005   # a round whose drafting took longer than this (s) drafted; a backed-off one takes ~0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--methods", default="ar,dspark-scheduled")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = BenchSettings(model="smollm2-135m-instruct", methods=[], max_new_tokens=args.max_new_tokens,
                             dtype=args.dtype)
    target = load_target(settings.model, DTYPES[args.dtype])
    prompts = [chat_ids(target.tokenizer, p) for p in load_first_turns(args.prompts, None)]
    c = args.concurrency
    for _ in range(args.repeats):
        for name in args.methods.split(","):
            engine = build_engine(settings.engine_config(name, c, 2048), target)
            for i in range(c):
                engine.add(GenerationRequest(uuid.uuid4().hex, tuple(prompts[i % len(prompts)]),
                                             SamplingParams(max_new_tokens=args.max_new_tokens)))
            reports, start = [], time.perf_counter()
            while engine.has_work:
                _, report = engine.step()
                if report is not None:
                    reports.append(report)
            wall = time.perf_counter() - start
            full = [r for r in reports if r.batch_size == c]
            plain = [r.round_seconds for r in full if r.draft_seconds <= DRAFTED]
            drafted = [r.round_seconds for r in full if r.draft_seconds > DRAFTED]
            print(f"{name:17s} wall {wall:6.1f} s, {len(reports)} rounds; at batch {c}: {len(plain)} plain"
                  + (f" (median {statistics.median(plain) * 1e3:.0f} ms)" if plain else "")
                  + f", {len(drafted)} drafted"
                  + (f" (mean {statistics.fmean(drafted) * 1e3:.0f} ms)" if drafted else ""), flush=True)


if __name__ == "__main__":
    main()
