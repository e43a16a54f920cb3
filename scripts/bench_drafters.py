"""τ of several trained drafters on the same prompts, one target load (`bench` takes one --drafter).

    .venv/bin/python scripts/bench_drafters.py --prompts ../shared/eval/humaneval.jsonl --limit 4 \
        --drafter dspark=engine/drafters/shipped/smollm2-135m-dspark --drafter dflash=/tmp/dflash \
        --drafter eagle3=/tmp/eagle3 --max-new-tokens 96 --temperature 0

Prints one JSON line per method: τ, per-position acceptance (conditional on reaching the position),
tokens/s (median), exact match against plain decoding at temperature 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path

import torch

from engine.api import GenerationRequest, SamplingParams
from engine.bench import chat_ids
from engine.build import build_engine
from engine.config import EMBEDDED_MODEL, EngineConfig
from engine.loading import load_target
from engine.prompts import load_first_turns


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=Path, required=True)
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--drafter", action="append", default=[], help="METHOD=DIR (dspark, dflash or eagle3)")
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target(args.model, torch.float32)
    prompts = [chat_ids(target.tokenizer, q) for q in load_first_turns(args.prompts, args.limit)]
    methods = [("ar", None)] + [tuple(d.split("=", 1)) for d in args.drafter]
    outputs: dict[str, list] = {}
    for method, drafter in methods:
        engine = build_engine(EngineConfig(model=args.model, method=method, drafter=drafter, max_batch=1,
                                           max_context=2048), target)
        rounds = accepted = 0
        reached: list[int] = []
        acc_at: list[int] = []
        speeds, outs = [], []
        for i, ids in enumerate(prompts):
            sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=i)
            start = time.perf_counter()
            r = engine.generate(GenerationRequest(uuid.uuid4().hex, tuple(ids), sampling))
            speeds.append(len(r.output_ids) / (time.perf_counter() - start))
            outs.append(list(r.output_ids))
            rounds += r.stats.rounds
            accepted += r.stats.accepted_tokens
            for k, (n, a) in enumerate(zip(r.stats.reached, r.stats.accepted_at)):
                if k == len(reached):
                    reached.append(0)
                    acc_at.append(0)
                reached[k] += n
                acc_at[k] += a
        outputs[method] = outs
        exact = (sum(a == b for a, b in zip(outs, outputs["ar"])) / len(outs)) if args.temperature == 0 else None
        print(json.dumps({"method": method, "drafter": drafter, "prompts": str(args.prompts), "n": len(prompts),
                          "temperature": args.temperature, "tau": round((accepted + rounds) / rounds, 3) if rounds else None,
                          "acceptance": [round(a / n, 3) if n else 0.0 for a, n in zip(acc_at, reached)],
                          "tokens_per_s": round(statistics.median(speeds), 1), "exact_vs_ar": exact}), flush=True)


if __name__ == "__main__":
    main()
