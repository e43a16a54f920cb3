"""`dspark-node peers --bootstrap MULTIADDR [--model M] [--json]`: join the peer network as a
client and list the live workers with their adverts."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from node.config import model_id
from node.identity import Identity
from node.p2p.adverts import LiveAdvert, now_ms
from node.p2p.discovery import Discovery, DiscoveryError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("peers", help="list live workers on the peer network and their adverts")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="peer to join through, /ip4/.../tcp/.../p2p/<peer id> (repeatable)")
    parser.add_argument("--mdns", action="store_true", help="also find peers on the LAN by mDNS")
    parser.add_argument("--model", type=model_id,
                        help="only workers serving this model, by id or alias (also asks the DHT)")
    parser.add_argument("--wait", type=float, default=3.0, metavar="SECONDS",
                        help="how long to listen for adverts after joining (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="one JSON object per worker, one per line")
    parser.set_defaults(func=run)


def describe(live: LiveAdvert, at_ms: int) -> dict:
    a = live.advert
    return {
        "peer_id": a.peer_id, "grpc_endpoint": a.grpc_endpoint, "listen_addrs": list(a.listen_addrs),
        "models": [{"id": m.id, "digest": m.digest.hex(), "drafter": m.drafter, "max_context": m.max_context}
                   for m in a.models],
        "gpu": {"name": a.gpu.name, "count": a.gpu.count, "memory_bytes": a.gpu.memory_bytes},
        "price_per_mtok_micros": a.price_per_mtok_micros, "free_slots": a.free_slots,
        "queue_depth": a.queue_depth, "tokens_per_second": a.tokens_per_second, "sequence": a.sequence,
        "age_s": round((at_ms - a.issued_at_ms) / 1000, 1), "ttl_seconds": a.ttl_seconds,
        "tls": bool(a.tls_cert_sha256),
    }


async def _collect(args: argparse.Namespace) -> list[LiveAdvert]:
    discovery = Discovery(Identity.generate(), args.bootstrap, mdns=args.mdns)
    await discovery.start()
    try:
        if args.model:
            await discovery.find_workers(args.model, wait_s=args.wait)
        await asyncio.sleep(args.wait)  # gossip brings the rest within an advert interval
        return discovery.adverts(args.model)
    finally:
        await discovery.stop()


# Adverts come every few seconds (p2p.advert_interval_s); an hour is more than any listing needs, and
# NaN (it passed "not negative" and listened as 0) or inf (listened forever) is no duration.
_MAX_WAIT_S = 3600.0


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.wait <= _MAX_WAIT_S:
        print(f"peers: --wait must be from 0 to {_MAX_WAIT_S:g} seconds, got {args.wait}", file=sys.stderr)
        return 2
    try:
        workers = asyncio.run(_collect(args))
    except DiscoveryError as exc:
        print(f"peers: {exc}", file=sys.stderr)
        return 1
    at = now_ms()
    rows = sorted((describe(w, at) for w in workers), key=lambda r: r["peer_id"])
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    if not rows:
        print("no live workers seen")
        return 0
    print(f"{'PEER ID':54} {'GRPC':21} {'MODELS':24} {'PRICE/MTOK':>10} {'FREE':>4} {'QUEUE':>5} {'TOK/S':>7}")
    for r in rows:
        models = ",".join(m["id"] for m in r["models"])
        print(f"{r['peer_id']:54} {r['grpc_endpoint']:21} {models:24} {r['price_per_mtok_micros']:>10} "
              f"{r['free_slots']:>4} {r['queue_depth']:>5} {r['tokens_per_second']:>7.1f}")
    return 0
