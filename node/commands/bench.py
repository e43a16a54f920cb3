"""`dspark-node bench`: every method on the same prompts, interleaved, JSON + a readable table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from engine.bench import ENGINE_METHODS, PEERS, BenchSettings, format_table, run_bench
from engine.bench_batch import run_serving_bench
from engine.drafters.init import KINDS
from engine.loading import ModelLoadError
from engine.prompts import PromptFileError, load_first_turns
from node.commands.flags import flag_errors
from node.commands.generate import add_engine_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark decoding methods side by side",
                       description="Run each method on the same prompts in one process, interleaved; "
                                   "report median tokens/s, tau, per-position acceptance and exactness.")
    p.add_argument("--prompts", type=Path, required=True, help='JSON-lines file of {"turns": [...]}')
    p.add_argument("--methods", default="ar,ngram,hf-greedy,hf-pld",
                   help=f"comma-separated, from {', '.join((*ENGINE_METHODS, *PEERS))} "
                        "(with --concurrency: all but the hf- peers)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=10, help="first N prompts (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--concurrency", default=None,
                   help="serving benchmark: comma-separated concurrencies (e.g. 1,2,4,8); at each, c users "
                        "serve the --limit prompts (at least c) closed-loop, a new request joining as one "
                        "finishes; --methods as above, less the hf- peers")
    p.add_argument("--repeats", type=int, default=1,
                   help="with --concurrency: run the methods this many times at each level, interleaved in "
                        "rotating order; rows report medians and the median speed ratio to the first method "
                        "(default: %(default)s)")
    p.add_argument("--plots", type=Path, default=None,
                   help="write PNG plots into this folder (acceptance per position; with --concurrency: "
                        "throughput and budget)")
    p.add_argument("--method-drafter", action="append", default=[], metavar="METHOD=DIR",
                   help="drafter for one method (dspark, dflash, eagle3), over --drafter; repeatable, "
                        "so that several trained drafters are compared in one run")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.concurrency is not None:
        return run_serving(args, methods)
    if args.repeats != 1:
        print("error: --repeats is for the serving benchmark (--concurrency); the single-user bench already "
              "interleaves the methods prompt by prompt and reports medians", file=sys.stderr)
        return 2
    unknown = [m for m in methods if m not in (*ENGINE_METHODS, *PEERS)]
    if unknown or not methods:
        print(f"error: unknown method(s) {', '.join(unknown) or '(none given)'}; "
              f"choose from {', '.join((*ENGINE_METHODS, *PEERS))}", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1 or args.limit < 1:
        print("error: --max-new-tokens and --limit must be at least 1", file=sys.stderr)
        return 2
    report = _run(args, lambda settings, prompts, progress: run_bench(settings, prompts, progress), methods)
    if report is None:
        return 2
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plots:
        from engine.bench_plots import plot_acceptance
        name = f"acceptance-{Path(args.prompts).stem}-t{args.temperature:g}.png"
        print(f"wrote {plot_acceptance(report, args.plots / name)}", file=sys.stderr)
    return 0


def _method_drafters(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        method, sep, directory = pair.partition("=")
        if not sep or method not in KINDS or not directory:
            raise ValueError(f"--method-drafter expects METHOD=DIR with METHOD one of {', '.join(KINDS)}; "
                             f"got {pair!r}")
        out[method] = directory
    return out


def _run(args: argparse.Namespace, bench, methods: list[str]) -> dict | None:
    """Load the prompts, run `bench(settings, prompts, progress)`; None after printing a bad input."""
    try:
        prompts = load_first_turns(args.prompts, args.limit)
        settings = BenchSettings(model=args.model, methods=methods, max_new_tokens=args.max_new_tokens,
                                 dtype=args.dtype, temperature=args.temperature, drafter=args.drafter,
                                 drafters=_method_drafters(args.method_drafter),
                                 block_size=args.block_size, seed=args.seed,
                                 confidence_threshold=args.confidence_threshold,
                                 lookup_min_match=args.lookup_min_match, device=args.device)
        report = bench(settings, prompts, lambda line: print(line, file=sys.stderr))
    except ValidationError as exc:
        print(f"error: {flag_errors(exc, {'drafters': '--method-drafter'})}", file=sys.stderr)
        return None
    except (ModelLoadError, PromptFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    report["prompts"] = str(args.prompts)
    return report


def run_serving(args: argparse.Namespace, methods: list[str]) -> int:
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1 or max(levels) > 1024:
        print(f"error: --concurrency must be comma-separated integers in 1..1024, got {args.concurrency!r}",
              file=sys.stderr)
        return 2
    if not 1 <= args.repeats <= 100:
        print(f"error: --repeats must be in 1..100, got {args.repeats}", file=sys.stderr)
        return 2
    report = _run(args, lambda settings, prompts, progress: run_serving_bench(settings, prompts, levels, progress,
                                                                              args.repeats), methods)
    if report is None:
        return 2
    for row in report["rows"]:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plots:
        from engine.bench_plots import plot_serving
        for path in plot_serving(report, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0
