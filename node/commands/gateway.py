"""`dspark-node gateway`: an OpenAI-compatible HTTP endpoint in front of the peer network
(node/gateway/, docs/gateway.md). Prints one JSON ready line on stdout once it serves."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from pathlib import Path

from pydantic import ValidationError

from node.config import split_host_port


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("gateway", help="serve the OpenAI API, running each request on the peer network")
    parser.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                        help="HTTP address (default %(default)s; off loopback, --api-key is required)")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="peer to join the network through (repeatable)")
    parser.add_argument("--mdns", action="store_true", help="also find peers on the LAN by mDNS")
    parser.add_argument("--key", type=Path, metavar="FILE", help="client key signing the jobs "
                        "(created if missing; default: DATA_DIR/client.key)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="key and receipt store (default: ~/.local/share/dspark-node/gateway)")
    parser.add_argument("--max-price", type=int, metavar="MICROS",
                        help="highest price per million output tokens to pay (default: any)")
    parser.add_argument("--max-price-gpu-second", type=int, metavar="MICROS",
                        help="highest price per GPU-second to pay (default: any; 0 pays no time charge)")
    parser.add_argument("--budget", type=int, metavar="AMOUNT",
                        help="micro-units each API key may spend (persisted; default: unlimited)")
    parser.add_argument("--api-key", action="append", default=[], metavar="KEY", dest="api_keys",
                        help="accepted bearer key (repeatable); required off loopback")
    parser.add_argument("--tls", default="auto", choices=["auto", "on", "off"],
                        help="TLS to workers: auto = required off loopback (default)")
    parser.add_argument("--attempts", type=int, default=3, metavar="N", help="workers to try per request")
    parser.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"dspark-node gateway: {message}", file=sys.stderr)
    return 2


_FLAGS = {"max_price_per_mtok_micros": "--max-price", "max_price_per_gpu_second_micros": "--max-price-gpu-second",
          "budget_micros": "--budget", "api_keys": "--api-key"}


def _flag(loc: tuple) -> str:
    """The command-line flag a config field came from ("" for a check across flags)."""
    if not loc:
        return ""
    return _FLAGS.get(str(loc[0]), "--" + str(loc[0]).replace("_", "-")) + ": "


def run(args: argparse.Namespace) -> int:
    from node.gateway.config import GatewayConfig

    values = dict(listen=args.listen, bootstrap=args.bootstrap, mdns=args.mdns, key=args.key,
                  max_price_per_mtok_micros=args.max_price,
                  max_price_per_gpu_second_micros=args.max_price_gpu_second, budget_micros=args.budget,
                  api_keys=tuple(args.api_keys), tls=args.tls, attempts=args.attempts)
    if args.data_dir is not None:
        values["data_dir"] = args.data_dir
    try:
        config = GatewayConfig(**values)
    except ValidationError as exc:
        return _fail("; ".join(f"{_flag(e['loc'])}{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()))
    try:
        return asyncio.run(_serve(config))
    except ValueError as exc:     # IdentityError, LedgerError, DiscoveryError...: a setup that cannot work
        return _fail(str(exc))


async def _serve(config) -> int:
    import uvicorn

    from node.gateway.app import GatewayApp
    from node.gateway.gateway import Gateway
    from node.identity import Identity
    from node.p2p.discovery import DiscoveryError

    host, port = split_host_port(config.listen)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {config.listen}: {exc.strerror}") from None
    identity = Identity.load_or_create(config.key_path)
    gateway = Gateway(config, identity)
    try:
        await gateway.start()
    except DiscoveryError as exc:
        gateway.store.close()
        sock.close()
        raise ValueError(f"cannot join the peer network: {exc}") from None
    server = uvicorn.Server(uvicorn.Config(GatewayApp(gateway).app, log_level="warning", access_log=False,
                                           lifespan="off", timeout_graceful_shutdown=3))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            bound = sock.getsockname()
            url = f"http://{f'[{bound[0]}]' if ':' in bound[0] else bound[0]}:{bound[1]}/v1"
            print(json.dumps({"event": "ready", "base_url": url, "peer_id": identity.peer_id,
                              "data_dir": str(config.data_dir)}), flush=True)
        await serving
    finally:
        await gateway.stop()
    return 0
