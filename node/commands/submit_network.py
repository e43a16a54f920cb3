"""The peer-network path of `dspark-node submit` (no --node): its flags and its run, called by
node/commands/submit.py, which checks the flags, reports a DiscoveryError or NoWorkerError, and
keeps the receipt as on the --node path (its ReceiptKeeper). Finds
a worker for --model through --bootstrap peers (or mDNS), with failover (node/p2p/failover.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from node.commands.terminal import answer_printer
from node.config import model_id
from node.identity import Identity
from node.p2p.failover import Attempt, submit_via_network

if TYPE_CHECKING:      # submit.py imports this module
    from node.commands.submit import ReceiptKeeper


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("peer network (used when --node is not given)")
    group.add_argument("--model", metavar="MODEL", type=model_id, help="model id (or alias) to find workers for")
    group.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                       help="peer to join through, /ip4/.../tcp/.../p2p/<peer id> (repeatable)")
    group.add_argument("--mdns", action="store_true", help="also find peers on the LAN by mDNS")
    group.add_argument("--attempts", type=int, default=3, metavar="N",
                       help="workers to try before giving up (default: %(default)s)")


def _failed_over(attempt: Attempt) -> None:
    print(f"\n[worker {attempt.peer_id} {attempt.outcome}: {attempt.detail}; trying the next one]",
          file=sys.stderr, flush=True)


def missing_flag(args: argparse.Namespace) -> str | None:
    """What the peer-network path lacks, when --node is not given."""
    if not args.model:
        return "give --node HOST:PORT, or --model MODEL to find a worker on the peer network"
    if not args.bootstrap and not args.mdns:
        return "to find a worker on the peer network give --bootstrap MULTIADDR (or --mdns)"
    return None


def run(args: argparse.Namespace, identity: Identity, keeper: ReceiptKeeper) -> int:
    prompt = {"text": args.prompt} if args.raw else {"chat": [{"role": "user", "content": args.prompt}]}
    outcome = asyncio.run(submit_via_network(
        identity, args.bootstrap, args.model, prompt, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed, max_price_per_mtok_micros=args.max_price,
        max_price_per_gpu_second_micros=args.max_price_gpu_second, tls=args.tls, timeout_s=args.timeout,
        idle_timeout_s=args.idle_timeout, max_attempts=args.attempts, mdns=args.mdns,
        on_text=answer_printer(), on_failover=_failed_over, on_completed=keeper.countersign))
    print()
    receipt = outcome.result.receipt
    first = f"{outcome.time_to_first_token_s:.2f} s" if outcome.time_to_first_token_s is not None else "n/a"
    print(f"[{outcome.result.finish_reason}] {receipt.output_tokens} tokens, {receipt.tokens_per_second:.1f} tok/s, "
          f"amount {receipt.amount_micros} micros, receipt #{receipt.sequence} verified (worker {outcome.worker}); "
          f"discovery {outcome.discovery_s:.2f} s, first token {first}", file=sys.stderr)
    return keeper.report(outcome.result)
