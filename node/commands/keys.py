"""`dspark-node keys new|show`: make or inspect an Ed25519 key file (a client's or a node's)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node.identity import Identity, IdentityError

DEFAULT_CLIENT_KEY = Path("~/.config/dspark-node/client.key")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="create or show an Ed25519 key (peer ID + public key)")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    new = sub.add_parser("new", help="create a key file (mode 0600); refuses to overwrite one")
    new.add_argument("--out", type=Path, default=DEFAULT_CLIENT_KEY, metavar="FILE",
                     help="where to write it (default: %(default)s)")
    new.set_defaults(func=run_new)
    show = sub.add_parser("show", help="print the peer ID and public key of a key file")
    show.add_argument("--key", type=Path, default=DEFAULT_CLIENT_KEY, metavar="FILE",
                      help="the key file (default: %(default)s)")
    show.set_defaults(func=run_show)


def _print(identity: Identity, path: Path) -> None:
    print(f"peer_id    {identity.peer_id}")
    print(f"public_key {identity.public_key.hex()}")
    print(f"file       {path}")


def run_new(args: argparse.Namespace) -> int:
    path = args.out.expanduser()
    if path.exists():
        print(f"dspark-node keys new: {path} already exists; not overwriting a key", file=sys.stderr)
        return 1
    identity = Identity.generate()
    try:
        identity.save(path)
    except OSError as exc:
        print(f"dspark-node keys new: cannot write {path}: {exc.strerror}", file=sys.stderr)
        return 1
    _print(identity, path)
    return 0


def run_show(args: argparse.Namespace) -> int:
    path = args.key.expanduser()
    try:
        identity = Identity.load(path)
    except IdentityError as exc:
        print(f"dspark-node keys show: {exc}", file=sys.stderr)
        return 1
    _print(identity, path)
    return 0
