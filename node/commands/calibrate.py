"""`dspark-node calibrate`: Sequential Temperature Scaling (with offsets, draft and history weights)
of a DSpark drafter's confidence head."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from engine.config import EMBEDDED_MODEL
from engine.loading import ModelLoadError
from engine.prompts import PromptFileError, load_first_turns


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="calibrate a DSpark drafter's confidences (STS)",
                       description="Decode held-out prompts with the drafter, fit a temperature, an offset, "
                                   "the weight of the draft's own log-odds and that of the request's own "
                                   "calibration error so far per draft position (left to right, minimising the "
                                   "log loss of the cumulative product; temperatures by ECE alone with "
                                   "--temperature-only) and store them in the drafter's config.json; prints "
                                   "ECE/AUROC/Brier per position before and after.")
    p.add_argument("--drafter", type=Path, required=True, help="DSpark drafter directory (rewritten in place)")
    p.add_argument("--prompts", type=Path, default=None,
                   help='JSON-lines {"turns": [...]} (default: 177 prompts, in turn the training recipe\'s held-out '
                        'code requests, unseen word problems and general requests written for calibration)')
    p.add_argument("--model", default=EMBEDDED_MODEL, help="target model (default: %(default)s)")
    p.add_argument("--limit", type=int, default=24, help="prompts to decode (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of the held-out decoding (default: %(default)s); 0 fits the "
                        "scaling greedy requests take (the confidence_*_greedy fields)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--temperature-only", action="store_true",
                   help="the paper's STS exactly: temperatures, no offsets, draft or history weights")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="share of the prompts (every 1/F-th) decoded apart, never fitted on, and reported on "
                        "before/after; 0: report on the fitting set, which flatters the fit (default: 0)")
    p.add_argument("--dry-run", action="store_true", help="report only; leave config.json as it is")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.train.calibrate import calibrate_drafter

    if args.limit < 1 or args.max_new_tokens < 1 or not 0 <= args.temperature <= 10 or not 0 <= args.holdout <= 0.5:
        print("error: --limit and --max-new-tokens must be >= 1, --temperature in [0, 10] and --holdout in [0, 0.5]",
              file=sys.stderr)
        return 2
    try:
        prompts = load_first_turns(args.prompts, args.limit) if args.prompts else None
        # the file itself, so that a fit on an evaluation set (shared/eval) shows in the drafter's record
        source = {"file": str(args.prompts.resolve()),
                  "sha256": hashlib.sha256(args.prompts.read_bytes()).hexdigest()} if args.prompts else None
        result = calibrate_drafter(args.drafter, args.model, prompts, args.limit, args.max_new_tokens,
                                   args.temperature, args.seed, write=not args.dry_run,
                                   temperature_only=args.temperature_only, device=args.device,
                                   holdout=args.holdout, prompt_source=source)
    except (ValidationError, ModelLoadError, PromptFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = (f"{result['held_out_prompts']} held-out prompts, never fitted on" if result["held_out_prompts"]
             else "the fitting set; --holdout reports on prompts never fitted on")
    print(f"fitted on {result['fit_rounds']} rounds; reported on {result['rounds']} rounds of {where}")
    print(f"temperatures {result['temperatures']}, offsets {result['offsets']}, "
          f"draft weights {result['draft_weights']}, history weights {result['history_weights']} "
          f"(prior {result['history_prior']})")
    # The floor: what a perfectly calibrated head would measure on these predictions and this many rounds.
    print(f"{'pos':>3} {'n':>5} {'ECE before':>10} {'ECE after':>9} {'floor':>6} {'AUROC before':>12} {'after':>6} "
          f"{'Brier before':>12} {'after':>6}")
    for b, a in zip(result["before"], result["after"]):
        auroc = ["-" if r["auroc"] is None else f"{r['auroc']:.3f}" for r in (b, a)]
        print(f"{a['position']:>3} {a['n']:>5} {b['ece']:>10.4f} {a['ece']:>9.4f} {a['ece_floor']:>6.4f} "
              f"{auroc[0]:>12} {auroc[1]:>6} {b['brier']:>12.4f} {a['brier']:>6.4f}")
    print(json.dumps({key: result[key] for key in ("temperatures", "offsets", "draft_weights", "history_weights",
                                                   "history_prior")}))
    return 0
