"""`dspark-node peers --bootstrap MULTIADDR [--model M] [--json]`: join the peer network as a
client and list the live workers with their adverts."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from node.commands.terminal import shown
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
        "tls": bool(a.tls_cert_sha256), "draining": a.draining,
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
    print("\n".join(table(rows)))
    return 0


def gpu_text(gpu: dict) -> str:
    """'2x NVIDIA H200' for a GPU worker, 'cpu' for one that serves on the CPU (count 0)."""
    return shown(f"{gpu['count']}x {gpu['name']}" if gpu["count"] else gpu["name"])


def table(rows: list[dict]) -> list[str]:
    """The listing's lines: a header, then one line per worker (`describe` rows), columns aligned."""
    def line(peer, grpc, gpu, models, price, free, queue, speed):
        return f"{peer:54} {grpc:21} {gpu:20} {models:36} {price:>10} {free:>5} {queue:>5} {speed:>7}"
    lines = [line("PEER ID", "GRPC", "GPU", "MODELS", "PRICE/MTOK", "FREE", "QUEUE", "TOK/S")]
    for r in rows:
        lines.append(line(r["peer_id"], shown(r["grpc_endpoint"]), gpu_text(r["gpu"]),
                          shown(",".join(m["id"] for m in r["models"])),
                          # a worker shutting down takes no job, whatever else its advert says
                          r["price_per_mtok_micros"], "drain" if r["draining"] else r["free_slots"], r["queue_depth"],
                          f"{r['tokens_per_second']:.1f}"))
    return lines
