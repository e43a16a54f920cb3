"""Per-token decode cost of the target alone: our forward vs transformers, same weights, same cache
length, interleaved. Usage: OMP_NUM_THREADS=1 python scripts/decode_step.py [--model M] [--steps N]"""

from __future__ import annotations

import argparse
import time

import torch

from engine.build import DTYPES
from engine.loading import load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--context", type=int, default=64)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    for dtype in ("bfloat16", "float32"):
        target = load_target(args.model, DTYPES[dtype])
        m = target.model
        hf = AutoModelForCausalLM.from_pretrained(target.path, dtype=DTYPES[dtype]).eval()
        x = torch.randint(0, m.args.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
        cache = m.new_cache(1, args.context + 4 * args.steps + 8)
        m.forward(x, torch.arange(args.context)[None], torch.tensor([0]), cache)
        with torch.inference_mode():
            past = hf(x, use_cache=True).past_key_values
        pos = [args.context]

        def ours() -> None:
            out = m.forward(x[:, :1], torch.tensor([[pos[0]]]), torch.tensor([0]), cache)
            m.logits(out.hidden[:, -1])
            pos[0] += 1

        def theirs() -> None:
            with torch.inference_mode():
                hf(x[:, :1], past_key_values=past, use_cache=True)

        for name, step in (("ours", ours), ("transformers", theirs)) * 2:
            step()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            print(f"{dtype:9} {name:12} {(time.perf_counter() - start) / args.steps * 1000:7.1f} ms/token")


if __name__ == "__main__":
    main()
