"""A peer-network-only worker for tests and scripts/p2p_swarm.py: runs the real P2PService with a
static capacity advert (no engine, no gRPC server). Prints one JSON line when ready
({"peer_id", "addrs"}), then runs until SIGTERM / SIGINT.

    python tests/p2p/static_worker.py --listen /ip4/127.0.0.1/tcp/0 [--bootstrap ADDR] [--model M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from dspark.v1.advert_pb2 import CapacityAdvert, GpuInfo, ModelOffer
from node.config import NodeConfig, P2PConfig
from node.events import AdvertPublished, AdvertSeen, EventBus
from node.identity import Identity
from node.p2p.service import P2PService


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--price", type=int, default=100_000)
    p.add_argument("--free-slots", type=int, default=4)
    p.add_argument("--tokens-per-second", type=float, default=30.0)
    p.add_argument("--grpc-endpoint", default="127.0.0.1:1")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--ttl", type=int, default=4)
    p.add_argument("--mdns", action="store_true")
    p.add_argument("--key", type=Path, help="key file (created if missing); a fresh key otherwise")
    return p.parse_args()


async def main() -> int:
    args = parse_args()
    identity = Identity.load_or_create(args.key) if args.key else Identity.generate()
    config = NodeConfig(grpc_listen=args.grpc_endpoint, p2p=P2PConfig(
        listen=[args.listen], bootstrap=args.bootstrap, mdns=args.mdns, advert_interval_s=args.interval,
        advert_ttl_s=args.ttl))
    advert = CapacityAdvert(
        grpc_endpoint=args.grpc_endpoint, gpu=GpuInfo(name="cpu", count=1),
        models=[ModelOffer(id=m, max_context=2048) for m in args.model],
        price_per_mtok_micros=args.price, free_slots=args.free_slots, tokens_per_second=args.tokens_per_second)
    events = EventBus()
    published: list[int] = []
    received = [0]

    def count(event: object) -> None:
        if isinstance(event, AdvertPublished):
            published.append(event.size_bytes)
        elif isinstance(event, AdvertSeen) and event.accepted:
            received[0] += 1

    events.subscribe(count)
    service = P2PService(config, identity, events, capacity=lambda: _copy(advert))
    await service.start()
    print(json.dumps({"peer_id": identity.peer_id, "addrs": service.network.listen_addrs()}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.stop()
    # What this node published and accepted, for the figures of scripts/p2p_swarm.py.
    print(json.dumps({"adverts_published": len(published), "advert_bytes": sum(published),
                      "adverts_received": received[0]}), flush=True)
    return 0


def _copy(advert: CapacityAdvert) -> CapacityAdvert:
    copy = CapacityAdvert()
    copy.CopyFrom(advert)
    return copy


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
