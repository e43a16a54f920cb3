"""Drafter cost: one propose() per block size against one target verify step (block + anchor tokens).

Random-weight drafters (DSpark: 5 layers + vanilla Markov rank 256 + confidence head; DFlash: 5
layers; EAGLE-3: 1 layer, one forward per drafted token) on the embedded SmolLM2-135M target, batch 1,
greedy, a 64-token context. Prints a markdown table of median milliseconds; with --draft-vocab N
the drafters propose from the N lowest token ids plus the context's other tokens (the cost of a
draft vocabulary of that size, engine/drafters/vocab.py).

    .venv/bin/python scripts/drafter_cost.py --dtype bfloat16 --blocks 1,2,4,7,8,12,16
    .venv/bin/python scripts/drafter_cost.py --dtype float32 --blocks 7 --draft-vocab 16384
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.api import GenerationRequest, SamplingParams
from engine.build import DTYPES
from engine.config import EMBEDDED_MODEL
from engine.drafters.checkpoint import DrafterCheckpoint, parse_config
from engine.drafters.context import PendingContext
from engine.drafters.dspark import DSparkDrafter
from engine.drafters.eagle3 import Eagle3Drafter
from engine.drafters.init import init_drafter
from engine.loading import load_target
from engine.sequence import Sequence

CONTEXT = 64


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def build(target, kind: str, block: int, draft_vocab: int):
    config, state = init_drafter(target, kind, layers=5, markov_rank=256, block_size=block)
    ckpt = DrafterCheckpoint(path=None, config=parse_config(config, kind), weights=state, digest=b"",
                             draft_vocab=torch.arange(draft_vocab) if draft_vocab else None)
    if kind == "eagle3":
        return Eagle3Drafter(ckpt, target.model, block, 1, 512, target.eos_token_ids)
    return DSparkDrafter(ckpt, target.model, kind, block, 1, 512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--blocks", default="1,2,4,7,8,12,16")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--draft-vocab", type=int, default=0, help="draft vocabulary size (0: the full vocabulary)")
    args = parser.parse_args()
    torch.manual_seed(0)
    target = load_target(EMBEDDED_MODEL, DTYPES[args.dtype])
    m = target.model
    cache = m.new_cache(1, 512)
    slot = torch.tensor([0])
    prompt = torch.randint(100, 40000, (1, CONTEXT))
    out = m.forward(prompt, torch.arange(CONTEXT)[None], slot, cache, taps=(1, 7, 14, 20, 27))
    feats = out.taps[0]
    blocks = [int(b) for b in args.blocks.split(",")]
    vocab = args.draft_vocab or "full"
    print(f"SmolLM2-135M, {args.dtype}, {torch.get_num_threads()} threads, context {CONTEXT}, draft vocabulary "
          f"{vocab}, median ms of {args.reps}")
    print("| block | verify (block+1 tokens) | dspark | dflash | eagle3 |")
    print("|---:|---:|---:|---:|---:|")
    for block in blocks:
        ids = torch.randint(100, 40000, (1, block + 1))
        pos = torch.arange(CONTEXT, CONTEXT + block + 1)[None]
        verify = median_ms(lambda: m.logits(m.forward(ids, pos, slot, cache, taps=(1, 7, 14, 20, 27)).hidden),
                           args.reps)
        row = [f"{verify:.1f}"]
        for kind in ("dspark", "dflash", "eagle3"):
            drafter = build(target, kind, block, args.draft_vocab)
            req = GenerationRequest("b", tuple(prompt[0].tolist()), SamplingParams(max_new_tokens=64))
            seq = Sequence(request=req, generator=torch.Generator(), tokens=prompt[0].tolist() + [5],
                           prompt_len=CONTEXT, slot=0, kv_len=CONTEXT)
            drafter.start(seq, feats)
            drafter.propose([seq])          # ingest the prompt once

            def one_round():
                # a round that accepted nothing: one new context position, then the block
                seq.drafter_state = PendingContext([feats[-1:]], cached=CONTEXT - 1)
                drafter.propose([seq])
            row.append(f"{median_ms(one_round, args.reps):.1f}")
        print(f"| {block} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
