"""`dspark-node generate`: run the engine on a prompt and stream only the generated text to stdout."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

from pydantic import ValidationError

from engine.api import GenerationRequest, GenerationResult, RequestRejected, SamplingParams
from engine.build import build_engine
from engine.config import EMBEDDED_MODEL, EngineConfig, METHODS
from engine.loading import ModelLoadError
from engine.prompts import PromptFileError, load_first_turns
from node.commands.flags import flag_errors


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED_MODEL,
                        help="embedded model name, a local HF checkpoint directory, or an HF id (default: %(default)s)")
    parser.add_argument("--drafter", default=None, help="DeepSpec-format drafter directory")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--block-size", type=int, default=7, help="draft tokens per round (default: %(default)s)")
    parser.add_argument("--confidence-threshold", type=float, default=0.0,
                        help="dspark: verify drafts only up to the first confidence below this (0 = off)")
    parser.add_argument("--lookup-min-match", type=int, default=0,
                        help="dspark, dflash, eagle3: propose by prompt lookup where the last N tokens occurred "
                             "before (N from this to 3), the drafter elsewhere (0 = off; bench: the -lookup "
                             "methods use 2 unless set)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text on this machine (no daemon)",
                       description="Generate with the engine and stream the text to stdout; speed goes to stderr.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a user message (the model's chat template is applied)")
    src.add_argument("--prompts", type=Path, help='JSON-lines file of {"turns": [...]}; first turns are used')
    p.add_argument("--raw", action="store_true", help="send --prompt as raw text, without the chat template")
    p.add_argument("--method", choices=METHODS, default="ngram", help="(default: %(default)s)")
    add_engine_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="with --prompts: use the first N prompts")
    p.set_defaults(func=run)


def engine_config(args: argparse.Namespace, method: str, max_context: int = 4096) -> EngineConfig:
    return EngineConfig(model=args.model, method=method, drafter=args.drafter, dtype=args.dtype,
                        device=args.device, block_size=args.block_size, max_batch=1, max_context=max_context,
                        confidence_threshold=args.confidence_threshold, lookup_min_match=args.lookup_min_match)


def run(args: argparse.Namespace) -> int:
    try:
        prompts = [args.prompt] if args.prompt is not None else load_first_turns(args.prompts, args.limit)
        engine = build_engine(engine_config(args, args.method))
    except ValidationError as exc:
        print(f"error: {flag_errors(exc)}", file=sys.stderr)
        return 2
    except (ModelLoadError, PromptFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    for n, prompt in enumerate(prompts):
        if args.raw:
            ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                       add_generation_prompt=True)
            ids = ids if isinstance(ids, list) else ids["input_ids"]
        request = GenerationRequest(uuid.uuid4().hex, tuple(ids), sampling)
        try:
            engine.add(request)
        except RequestRejected as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        start = time.perf_counter()
        result = None
        while result is None:
            events, _ = engine.step()
            for event in events:
                if isinstance(event, GenerationResult):
                    result = event
                else:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
        elapsed = time.perf_counter() - start
        sys.stdout.write("\n")
        s = result.stats
        print(f"[{args.method}] {s.output_tokens} tokens in {elapsed:.2f} s = {s.output_tokens / elapsed:.1f} tok/s, "
              f"tau {s.tau:.2f}, finish {result.finish_reason}", file=sys.stderr)
    return 0
