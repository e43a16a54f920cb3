"""`dspark-node gateway`: an OpenAI-compatible HTTP endpoint in front of the peer network
(node/gateway/, docs/gateway.md). Prints one JSON ready line on stdout once it serves."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from pathlib import Path

from node.config import split_host_port
from node.gateway.config import GatewayConfig, refuse_readable_keys
from node.settings import ConfigError, load_settings

_FIELDS = GatewayConfig.model_fields


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gateway", help="serve the OpenAI API, running each request on the peer network",
        description="Serve the OpenAI API, running each request on the peer network. Settings come from, "
                    "lowest first: defaults, the --config TOML file (field names as in docs/gateway.md, e.g. "
                    "api_keys = [...]), DSPARK_GATEWAY_* environment variables (e.g. DSPARK_GATEWAY_API_KEYS, a "
                    "JSON list or comma-separated), then the flags given. API keys in a flag are visible to ps "
                    "and shell history: prefer the file or the environment.")
    # No flag has a default: only a flag given overrides the file and the environment.
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file of gateway settings")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help=f"HTTP address (default {_FIELDS['listen'].default}; off loopback, API keys "
                             "are required)")
    parser.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                        help="peer to join the network through (repeatable)")
    parser.add_argument("--mdns", action="store_true", default=None, help="also find peers on the LAN by mDNS")
    # Strings, not Paths, as `run`'s --data-dir: the config refuses '' (which Path would make '.').
    parser.add_argument("--key", metavar="FILE", help="client key signing the jobs "
                        "(created if missing; default: DATA_DIR/client.key)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help=f"key and receipt store (default: {_FIELDS['data_dir'].default})")
    parser.add_argument("--max-price", type=int, metavar="MICROS", dest="max_price_per_mtok_micros",
                        help="highest price per million output tokens to pay (default: any)")
    parser.add_argument("--max-price-gpu-second", type=int, metavar="MICROS", dest="max_price_per_gpu_second_micros",
                        help="highest price per GPU-second to pay (default: any; 0 pays no time charge)")
    parser.add_argument("--budget", type=int, metavar="AMOUNT", dest="budget_micros",
                        help="micro-units each API key may spend (persisted; default: unlimited)")
    parser.add_argument("--api-key", action="append", metavar="KEY", dest="api_keys",
                        help="accepted bearer key (repeatable; replaces those of the file and environment); "
                             "required off loopback")
    parser.add_argument("--tls", choices=["auto", "on", "off"],
                        help="TLS to workers: auto = required off loopback (default)")
    parser.add_argument("--attempts", type=int, metavar="N",
                        help=f"workers to try per request (default {_FIELDS['attempts'].default})")
    parser.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"dspark-node gateway: {message}", file=sys.stderr)
    return 2


# Flags named after their field need no entry: --data-dir sets data_dir.
_FLAGS = {"max_price_per_mtok_micros": "--max-price", "max_price_per_gpu_second_micros": "--max-price-gpu-second",
          "budget_micros": "--budget", "api_keys": "--api-key"}


def load(args: argparse.Namespace) -> GatewayConfig:
    """The settings: the flags given (each dest is its field) laid over the --config file and the
    environment. Raises ConfigError naming each bad value and where it came from, or a --config file
    whose API keys others may read."""
    given = {field: value for field, value in vars(args).items() if field in _FIELDS and value is not None}
    flag_names = {field: _FLAGS.get(field, "--" + field.replace("_", "-")) for field in given}
    config = load_settings(GatewayConfig, args.config, given, flag_names)
    if args.config is not None:     # checked whatever overrides its keys: the file still holds them
        refuse_readable_keys(args.config)
    return config


def run(args: argparse.Namespace) -> int:
    try:
        config = load(args)
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        return asyncio.run(_serve(config))
    except ValueError as exc:     # IdentityError, LedgerError, DiscoveryError...: a setup that cannot work
        return _fail(str(exc))


async def _serve(config) -> int:
    import uvicorn

    from node.gateway.app import GatewayApp
    from node.gateway.gateway import Gateway
    from node.data_dir import removed_if_the_start_fails
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
    with removed_if_the_start_fails(config.data_dir) as data_dir:
        identity = Identity.load_or_create(config.key_path)
        gateway = Gateway(config, identity)
        try:
            await gateway.start()
        except DiscoveryError as exc:
            gateway.store.close()
            sock.close()
            raise ValueError(f"cannot join the peer network: {exc}") from None
        data_dir.kept = True
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
