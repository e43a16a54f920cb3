"""`dspark-node health`: ask a node's standard gRPC health service whether it is SERVING.

Container HEALTHCHECKs and Kubernetes probes run it inside the node's own container; exit 0 when
SERVING, 1 otherwise, with one line saying why. Probes run it as `python -m node.commands.health`:
`dspark-node` loads every subcommand (torch, libp2p), seconds of CPU that a probe every few
seconds should not spend.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from node.probe import Endpoint, ProbeError, describe_rpc_error, health_status, parse_endpoint


def endpoint_argument(text: str) -> Endpoint:
    """argparse type for a gRPC endpoint: argparse shows an ArgumentTypeError's text, but for a
    ValueError only "invalid parse_endpoint value"."""
    try:
        return parse_endpoint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (write HOST:PORT, e.g. 127.0.0.1:7440 or [::1]:7440)") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grpc", default="127.0.0.1:7440", type=endpoint_argument, metavar="HOST:PORT",
                        help="the node's gRPC endpoint (default: %(default)s)")
    parser.add_argument("--tls", default="auto", choices=["auto", "on", "off"],
                        help="auto: TLS if the endpoint offers it (default), on: require TLS, off: plaintext")
    parser.add_argument("--service", default="",
                        help="health service name to ask about (default: the whole server)")
    parser.add_argument("--timeout", default=3.0, type=float, metavar="SECONDS",
                        help="give up after this long (default: %(default)s)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("health", help="check that a node's gRPC health service reports SERVING")
    add_arguments(parser)
    parser.set_defaults(func=run)


def standalone_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m node.commands.health",
                                     description="Exit 0 if the node's gRPC health service reports SERVING.")
    add_arguments(parser)
    return parser


# No probe waits a day; beyond some 10^9 s the socket layer overflows (NaN and inf fail the check too).
_MAX_TIMEOUT_S = 86400.0


def run(args: argparse.Namespace) -> int:
    if not 0 < args.timeout <= _MAX_TIMEOUT_S:
        print(f"health: --timeout must be more than 0 and at most {_MAX_TIMEOUT_S:g} seconds, got {args.timeout}",
              file=sys.stderr)
        return 2
    try:
        status = health_status(args.grpc, args.tls, args.timeout, args.service)
    except ProbeError as exc:
        print(f"health: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"health: {describe_rpc_error(args.grpc, exc)}", file=sys.stderr)
        return 1
    print(f"{args.grpc}: {status}")
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    return run(standalone_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
