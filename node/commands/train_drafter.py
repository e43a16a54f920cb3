"""`dspark-node train-drafter`: train a DSpark, DFlash or EAGLE-3 drafter for a target on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from engine.config import EMBEDDED_MODEL
from engine.loading import ModelLoadError
from node.commands.flags import flag_errors


def _comma_list(cast, what: str):
    """An argparse type: "a,b,c" -> [cast(a), cast(b), cast(c)], refused with `what` named."""
    def parse(text: str) -> list:
        try:
            return [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    return parse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-drafter", help="train a drafter (DSpark, DFlash or EAGLE-3) for a target",
                       description="Build the target cache (target-generated responses + stdlib code scored by "
                                   "the target), train with the DeepSpec losses, write a DeepSpec checkpoint.")
    p.add_argument("--kind", choices=["dspark", "dflash", "eagle3"], default="dspark", help="(default: %(default)s)")
    p.add_argument("--target", default=EMBEDDED_MODEL, help="target model (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="output drafter directory (also holds the resumable state)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="target cache directory (default: under ~/.cache/dspark-node/train-cache)")
    p.add_argument("--layers", type=int, default=None, help="drafter layers (DSpark/DFlash, default 1; EAGLE-3 has 1)")
    p.add_argument("--markov-rank", type=int, default=None, help="default 64")
    p.add_argument("--markov-type", choices=["vanilla", "gated", "rnn"], default=None, help="default vanilla")
    p.add_argument("--block-size", type=int, default=None, help="default 7")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from this exported drafter (same kind; its architecture and target layers) "
                        "instead of a fresh one, e.g. to fine-tune on new data; its calibration is dropped, "
                        "its draft vocabulary kept")
    p.add_argument("--target-layers", type=_comma_list(int, "layer ids"), default=None,
                   help="tapped target layers, e.g. 1,10,18,27 (default: 4 evenly spaced)")
    p.add_argument("--steps", type=int, default=1000,
                   help="optimizer steps (the LR schedule spans them; default: %(default)s)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this long (resumable)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default: %(default)s)")
    p.add_argument("--anchors", type=int, default=512,
                   help="anchors (blocks) per sequence, at most (default: %(default)s)")
    p.add_argument("--lr", type=float, default=6e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--save-every", type=int, default=100,
                   help="steps between resumable states (weights + optimizer; raise it for fast GPU steps; "
                        "default: %(default)s)")
    p.add_argument("--gen-minutes", type=float, default=5.0,
                   help="time for target-generated responses (default: %(default)s)")
    p.add_argument("--gen-max-new-tokens", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--gen-temperatures", type=_comma_list(float, "temperatures"), default=[0.7],
                   help="response n is decoded at the n-th of these, cyclically (0 = greedy; default 0.7)")
    p.add_argument("--gen-batch", type=int, default=32, help="responses generated at a time (default: %(default)s)")
    p.add_argument("--gen-skip", type=int, default=0,
                   help="pass over the first N generation requests (a second cache of new requests)")
    p.add_argument("--stdlib-tokens", type=int, default=100_000,
                   help="tokens of stdlib code scored by the target (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per training sequence (default: %(default)s)")
    p.add_argument("--topk", type=int, default=8,
                   help="target probabilities kept per token in the cache (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda[:N]: where generation, the target cache and training run (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="arithmetic of response generation and training: bfloat16 decodes in bf16 and trains "
                        "under autocast with fp32 weights and optimizer (faster on a GPU or a CPU with AMX); the "
                        "cache is scored in fp32 either way (default: %(default)s)")
    p.add_argument("--cache-only", action="store_true",
                   help="build the target cache and stop (train the kinds from it later, e.g. side by side)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.train.cache import CacheError
    from engine.train.pipeline import TrainOptions, run as run_pipeline
    from engine.train.trainer import STATE_FILE, TrainingError
    from engine.drafters.checkpoint import CheckpointError

    try:
        opts = TrainOptions(kind=args.kind, model=args.target, out=args.out, cache_dir=args.cache_dir,
                            layers=args.layers, markov_rank=args.markov_rank, markov_type=args.markov_type,
                            block_size=args.block_size, init_from=args.init_from,
                            target_layers=args.target_layers, steps=args.steps,
                            minutes=args.minutes, batch=args.batch, anchors=args.anchors, lr=args.lr,
                            seed=args.seed, resume=args.resume, save_every=args.save_every,
                            gen_minutes=args.gen_minutes,
                            gen_max_new_tokens=args.gen_max_new_tokens, gen_batch=args.gen_batch,
                            gen_temperatures=args.gen_temperatures, gen_skip=args.gen_skip,
                            stdlib_tokens=args.stdlib_tokens, max_len=args.max_len, topk=args.topk,
                            threads=args.threads,
                            device=args.device, dtype=args.dtype, cache_only=args.cache_only)
    except ValidationError as exc:
        print(f"error: {flag_errors(exc)}", file=sys.stderr)
        return 2
    try:
        summary = run_pipeline(opts, log=lambda line: print(line, file=sys.stderr))
    except (ModelLoadError, CacheError, TrainingError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if (args.out / STATE_FILE).exists():
            print(f"interrupted: the state is saved, continue with --resume --out {args.out}", file=sys.stderr)
        else:   # stopped while the cache was built or loaded: a cache without its manifest is built again
            print("interrupted before training began: there is no state to resume; run the command again",
                  file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    return 0
