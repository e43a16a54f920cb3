"""`dspark-node run`: start the worker daemon (embedded defaults when given no config)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from node.config import load_config
from node.settings import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the worker node (gRPC, dashboard, p2p adverts)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML config file (default: embedded defaults)")
    # A string, not a Path: the config refuses '' (which Path would make '.').
    parser.add_argument("--data-dir", metavar="DIR", help="key, ledger and replay cache")
    parser.add_argument("--grpc-listen", metavar="HOST:PORT", help="gRPC address (default 127.0.0.1:7440)")
    parser.add_argument("--http-listen", metavar="HOST:PORT", help="metrics + dashboard (default 127.0.0.1:7441)")
    parser.add_argument("--p2p-listen", metavar="MULTIADDR", action="append",
                        help="libp2p listen address (repeatable; default /ip4/127.0.0.1/tcp/7442; "
                             "pass '' to run without the peer network)")
    parser.add_argument("--bootstrap", metavar="MULTIADDR", action="append",
                        help="libp2p peer to join through (repeatable, as for peers, submit and gateway)")
    parser.set_defaults(func=run)


# The setting each flag sets, so that a refused value is named by the flag the operator typed.
FLAG_NAMES = {"data_dir": "--data-dir", "grpc_listen": "--grpc-listen", "http_listen": "--http-listen",
              "p2p.listen": "--p2p-listen", "p2p.bootstrap": "--bootstrap"}


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, as a nested dict laid over the config file and environment."""
    values: dict[str, Any] = {}
    for flag in ("data_dir", "grpc_listen", "http_listen"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    p2p: dict[str, Any] = {}
    if args.p2p_listen is not None:
        p2p["listen"] = [addr for addr in args.p2p_listen if addr]
    if args.bootstrap is not None:
        p2p["bootstrap"] = args.bootstrap
    if p2p:
        values["p2p"] = p2p
    return values


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, overrides(args), FLAG_NAMES)
    except ConfigError as exc:
        print(f"dspark-node run: {exc}", file=sys.stderr)
        return 2
    # Imported here: loading torch and the engine is not needed to report a bad config.
    from node.daemon import run_daemon

    try:
        return asyncio.run(run_daemon(config))
    except ValueError as exc:   # SetupError, IdentityError, TlsError, ModelLoadError...: a bad setup
        print(f"dspark-node run: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Only a Ctrl-C before the node serves ends up here (later, the daemon stops gracefully), and
        # the start has removed a data dir it made (one it found is kept). The model load it cut short
        # may still run in its thread (node.daemon.load_engine): the interpreter's exit would abort
        # inside torch ('terminate called without an active exception', status -6), so the process
        # leaves without one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
