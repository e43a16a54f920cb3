"""`dspark-node` command line: one module per subcommand under node/commands/."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# grpc's core logs on its own, past --log-level, and at INFO writes a line for each connection that
# fails the TLS handshake: anyone who can reach the port (a scanner) wrote into the node's log at will.
# Its errors still show. Read when grpc loads, so set before any command imports it; the operator's
# own GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

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
    "node.commands.train_drafter",
    "node.commands.calibrate",
    "node.commands.draft_vocab",
    "node.commands.gateway",
]


def command_name(module: str) -> str:
    return module.rsplit(".", 1)[-1].replace("_", "-")


def _chosen_command(argv: list[str]) -> str | None:
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _add_global_flags(parser: argparse.ArgumentParser, default: str | None = argparse.SUPPRESS) -> None:
    parser.add_argument("--log-level", default=default,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity (stderr)")


def _accept_global_flags(parser: argparse.ArgumentParser) -> None:
    """The global flags on every (sub)command too: `submit ... --log-level DEBUG` is how people type
    it. Their default there is SUPPRESS, so a command not given one keeps the top level's value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_global_flags(command)
                _accept_global_flags(command)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dspark-node",
        description="Worker node for decentralized GPU markets, serving DSpark speculative decoding.")
    _add_global_flags(parser, "WARNING")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = {command_name(m): m for m in COMMANDS}
    chosen = _chosen_command(sys.argv[1:] if argv is None else argv)
    for name, module in names.items():
        # Only the chosen command's module is imported (torch, libp2p... are slow to load): a
        # health probe or `receipts verify` starts in a fraction of a second. Top-level --help
        # loads them all to list their help lines.
        if chosen in names and name != chosen:
            sub.add_parser(name)
        else:
            importlib.import_module(module).register(sub)
    _accept_global_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
