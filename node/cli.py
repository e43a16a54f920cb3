"""`dspark-node` command line: one module per subcommand under node/commands/."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each module defines `register(subparsers)`, which adds its parser and sets `func=run(args) -> int`.
COMMANDS = [
    "node.commands.generate",
    "node.commands.bench",
    "node.commands.health",
    "node.commands.doctor",
    "node.commands.receipts",
    "node.commands.peers",
    "node.commands.run",
    "node.commands.submit",
    "node.commands.keys",
    "node.commands.gateway",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dspark-node",
        description="Worker node for decentralized GPU markets, serving DSpark speculative decoding.")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity (stderr)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
