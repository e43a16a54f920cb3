"""`dspark-node draft-vocab`: restrict a drafter's proposals to the target's most frequent choices."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.config import EMBEDDED_MODEL
from engine.loading import ModelLoadError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("draft-vocab", help="give a drafter a frequent-token draft vocabulary (faster drafting)",
                       description="Count the target's next-token choices on a training cache (train-drafter "
                                   "--cache-dir), keep the --size most frequent and store them with the drafter "
                                   "(draft_vocab.safetensors): its LM head then runs over those rows only. "
                                   "Output stays lossless; a token outside the subset is never drafted. Delete "
                                   "the file to go back to the full vocabulary.")
    p.add_argument("--drafter", type=Path, required=True, help="drafter directory (DSpark, DFlash or EAGLE-3)")
    p.add_argument("--cache-dir", type=Path, required=True, help="a target cache of the same model")
    p.add_argument("--size", type=int, required=True, help="tokens to keep, e.g. 16384 of SmolLM2's 49152")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="target model (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.train.cache import CacheError
    from engine.train.draft_vocab import build_draft_vocab

    if args.size < 1:
        print(f"error: --size must be at least 1, got {args.size}", file=sys.stderr)
        return 2
    try:
        result = build_draft_vocab(args.drafter, args.cache_dir, args.size, args.model, args.device)
    except (ModelLoadError, CacheError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.drafter}: draft vocabulary of {result['size']} tokens covering {100 * result['coverage']:.2f}% "
          f"of the target's {result['counted_positions']} choices in {args.cache_dir}")
    return 0
