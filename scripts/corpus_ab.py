"""What prompt lookup across requests adds (engine/drafters/corpus.py): `dspark-lookup-scheduled`
(what `method = auto` serves) with each request's own text only and with the corpus of the other
requests' text, beside `ar`, each concurrency level served by the three in turn, `--repeats` times
with the order rotated. Each run is a fresh client: its corpus starts empty and holds the prompts
and replies of that run's earlier and concurrent requests (never a copy of the same prompt).

    python scripts/corpus_ab.py --prompts mixed32.jsonl --concurrency 1,4,16 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from engine.bench import BenchSettings, chat_ids
from engine.bench_batch import serve_closed_loop
from engine.build import DTYPES, build_engine
from engine.config import EMBEDDED_MODEL
from engine.loading import load_target
from engine.prompts import load_first_turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(c) for c in args.concurrency.split(",")]
    method = "dspark-lookup-scheduled"
    settings = BenchSettings(model=EMBEDDED_MODEL, methods=[method], max_new_tokens=args.max_new_tokens,
                             dtype=args.dtype)
    target = load_target(settings.model, DTYPES[args.dtype])
    prompts = [chat_ids(target.tokenizer, p) for p in load_first_turns(args.prompts, args.limit)]
    corpus = settings.engine_config(method, max(levels), 2048)
    engines = {"ar": build_engine(settings.engine_config("ar", max(levels), 2048), target),
               "own": build_engine(corpus.model_copy(update={"lookup_corpus_tokens": 0}), target),
               "corpus": build_engine(corpus, target)}
    names = list(engines)
    for c in levels:
        batch = [prompts[i % len(prompts)] for i in range(max(c, len(prompts)))]
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for rep in range(args.repeats):
            for name in names[rep % 3:] + names[:rep % 3]:
                run = serve_closed_loop(engines[name], batch, c, settings)
                runs[name].append(run)
                print(f"c={c:<3} {name:7s} {run['tokens_per_s']:6.1f} tokens/s, per user "
                      f"{run['per_user_tokens_per_s']:5.1f}, tau {run['tau'] or 1:.2f}, budget "
                      f"{run['mean_budget']:.2f}, proposals {run['drafted_share']:.0%}", flush=True)
        for name in names:
            ratio = statistics.median(r["tokens_per_s"] / a["tokens_per_s"] for r, a in zip(runs[name], runs["ar"]))
            user = statistics.median(r["per_user_tokens_per_s"] / a["per_user_tokens_per_s"]
                                     for r, a in zip(runs[name], runs["ar"]))
            tau = statistics.median(r["tau"] or 1 for r in runs[name])
            print(f"c={c:<3} {name:7s} median {ratio:.2f}x ar's tokens/s, {user:.2f}x per user, tau {tau:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
