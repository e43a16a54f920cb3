"""What a seed costs in accepted drafts: the same prompts and seeds decoded by a drafter's engine at a
sampling temperature with the requests' seeds (position-coupled draws) and without (rejection
sampling, their generators seeded alike), in turn prompt by prompt (docs/benchmarks.md, "Seeded
requests"):

    OMP_NUM_THREADS=1 python scripts/seeded_acceptance.py --eval-dir ../shared/eval --limit 2 --seeds 1,2
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import torch

from engine.api import GenerationRequest, SamplingParams
from engine.bench import chat_ids
from engine.build import build_engine
from engine.config import EngineConfig
from engine.prompts import load_first_turns

SETS = ("humaneval", "mbpp", "gsm8k", "mt-bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-dir", type=Path, required=True, help="holds humaneval.jsonl, mbpp.jsonl, ...")
    parser.add_argument("--limit", type=int, default=2, help="first prompts of each set")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--method", default="dspark", help="engine method (default: the full block)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = build_engine(EngineConfig(method=args.method, max_batch=1, max_context=2048))
    totals = {seeded: [0, 0] for seeded in (False, True)}     # accepted drafts, rounds
    for name in SETS:
        for prompt in load_first_turns(args.eval_dir / f"{name}.jsonl", args.limit):
            ids = tuple(chat_ids(engine.tokenizer, prompt))
            for seed in (int(s) for s in args.seeds.split(",")):
                for seeded in (False, True):
                    engine.rng.seed(seed)
                    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                              seed=seed if seeded else None)
                    stats = engine.generate(GenerationRequest(uuid.uuid4().hex, ids, sampling)).stats
                    totals[seeded][0] += stats.accepted_tokens
                    totals[seeded][1] += stats.rounds
    for seeded, (accepted, rounds) in totals.items():
        print(f"{'seeded (coupled)' if seeded else 'unseeded (rejection)':>22}: tau {(accepted + rounds) / rounds:.3f} "
              f"({accepted} drafts accepted in {rounds} rounds)")


if __name__ == "__main__":
    main()
