"""`dspark-node doctor`: check the machine an operator rented before (or while) the node runs on it.

Prints one line per check, and under each problem the thing to do; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from engine.loading import cache_root
from node.config import NodeConfig, load_config
from node.doctor import (Check, check_clock, check_cuda, check_disk, check_exposure, check_gpu, check_key,
                         check_port, data_dir_peer_id, node_peer_id, tcp_listen_of_multiaddr)
from node.commands.health import endpoint_argument
from node.gpu import detect_gpus
from node.probe import parse_endpoint
from node.settings import ConfigError

_MARKS = {"ok": "[ok]  ", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("doctor", help="check GPU, CUDA, ports, disk, clock and key; print what to fix")
    parser.add_argument("--config", type=Path, metavar="FILE", help="the node's TOML config (default: none)")
    # A string, not a Path: the config refuses '' (which Path would make '.').
    parser.add_argument("--data-dir", metavar="DIR", help="the node's data dir (overrides the config)")
    parser.add_argument("--peer", type=endpoint_argument, metavar="HOST:PORT",
                        help="another node's gRPC endpoint to compare clocks with (skipped without it)")
    parser.add_argument("--tls", default="auto", choices=["auto", "on", "off"],
                        help="transport to the peer and to the local node (default: %(default)s)")
    parser.add_argument("--require-gpu", action="store_true",
                        help="fail when no usable GPU is found (implied by engine.device = cuda)")
    parser.add_argument("--min-free-gb", type=float, default=10.0, metavar="GIB",
                        help="free disk wanted for the data dir and the model cache (default: %(default)s)")
    parser.add_argument("--max-skew-s", type=float, metavar="SECONDS",
                        help="clock skew tolerated (default: the config's admission.clock_skew_s)")
    parser.set_defaults(func=run)


def _grpc_port_peer_id(config: NodeConfig, tls: str) -> str | None:
    """The peer ID of the node already answering on this config's gRPC port (then its ports are in
    use by it, not by a conflicting program); None when no node answers there."""
    endpoint = parse_endpoint(config.grpc_listen.replace("0.0.0.0:", "127.0.0.1:").replace("[::]:", "[::1]:"))
    return node_peer_id(endpoint, tls, timeout=2.0)


def diagnose(config: NodeConfig, args: argparse.Namespace) -> list[Check]:
    report = detect_gpus()
    checks = [check_gpu(report, config.engine.device, args.require_gpu), check_cuda(report)]
    checks += check_exposure(config)
    serving, own = _grpc_port_peer_id(config, args.tls), data_dir_peer_id(config.data_dir)
    listens = [("grpc_listen", config.grpc_listen), ("http_listen", config.http_listen)]
    listens += [("p2p.listen", tcp) for tcp in map(tcp_listen_of_multiaddr, config.p2p.listen) if tcp]
    checks += [check_port(field, listen, serving, own) for field, listen in listens]
    min_free = int(args.min_free_gb * 2**30)
    checks.append(check_disk("data_dir", config.data_dir, min_free))
    checks.append(check_disk("model cache", cache_root(), min_free))
    checks.append(check_key(config.data_dir))
    max_skew = args.max_skew_s if args.max_skew_s is not None else config.admission.clock_skew_s
    checks.append(check_clock(args.peer, args.tls, max_skew))
    return checks


def render(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{_MARKS[check.status]} {check.name}: {check.detail}")
        if check.fix and check.status != "ok":
            lines.append(f"         fix: {check.fix}")
    failed = sum(check.status == "fail" for check in checks)
    warned = sum(check.status == "warn" for check in checks)
    lines.append(f"{failed} failed, {warned} warning(s), {len(checks)} checks")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    for flag, value in (("--min-free-gb", args.min_free_gb), ("--max-skew-s", args.max_skew_s)):
        # Written so that NaN fails too: it would turn the clock check off, and the disk one into a traceback.
        if value is not None and not 0 <= value < math.inf:
            print(f"doctor: {flag} must be a finite number, not negative; got {value}", file=sys.stderr)
            return 2
    overrides = {"data_dir": args.data_dir} if args.data_dir is not None else {}
    try:
        config = load_config(args.config, overrides, {"data_dir": "--data-dir"})
    except ConfigError as exc:
        print(f"{_MARKS['fail']} config: {exc}\n         fix: correct the file or DSPARK_* variable named above")
        return 1
    source = args.config or "defaults + DSPARK_* environment"
    print(f"dspark-node doctor (config: {source}, data dir: {config.data_dir}, uid {os.geteuid()})")
    checks = diagnose(config, args)
    print(render(checks))
    return 1 if any(check.status == "fail" for check in checks) else 0
