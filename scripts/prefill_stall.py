"""How long a long prompt joining the batch stalls a request that is already decoding.

One request decodes a story; at its sixth step a prompt of --prompt-tokens tokens joins. Over 60
steps, prints the longest and median gap between the running request's token events and the
joining request's time to first token (docs/benchmarks.md, "Chunked prefill").

    OMP_NUM_THREADS=1 python scripts/prefill_stall.py --prompt-tokens 2000 --prefill-chunk 512
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from engine.api import GenerationRequest, SamplingParams
from engine.bench import chat_ids
from engine.build import build_engine
from engine.config import EngineConfig
from engine.loading import load_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target("smollm2-135m-instruct", torch.float32)
    engine = build_engine(EngineConfig(method="ar", max_batch=2, max_context=args.prompt_tokens + 64,
                                       prefill_chunk=args.prefill_chunk), target)
    source = (Path(__file__).parents[1] / "engine" / "engine.py").read_text()
    long = tuple(target.tokenizer.encode(source * 8))[:args.prompt_tokens]
    story = tuple(chat_ids(target.tokenizer, "Tell me a long story about a dragon."))
    engine.add(GenerationRequest("running", story, SamplingParams(max_new_tokens=200)))
    gaps, last, first_token = [], None, None
    for step in range(60):
        if step == 5:
            engine.add(GenerationRequest("joining", long, SamplingParams(max_new_tokens=4)))
            joined = time.perf_counter()
        events, _ = engine.step()
        now = time.perf_counter()
        ids = {e.request_id for e in events}
        if "running" in ids:
            if last is not None:
                gaps.append(now - last)
            last = now
        if "joining" in ids and first_token is None:
            first_token = now - joined
        if not engine.has_work:
            break
    print(f"prompt {len(long)} tokens, prefill_chunk {args.prefill_chunk}: running request longest gap "
          f"{max(gaps):.2f} s, median {statistics.median(gaps):.3f} s; joining request's first token after "
          f"{first_token:.2f} s")


if __name__ == "__main__":
    main()
