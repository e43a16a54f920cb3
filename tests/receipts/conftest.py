"""Fixtures for the receipts / ledger tests: a ledger in a temp data dir, a tamperer, a CLI runner."""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path
from typing import Callable

import pytest
from receipts_helpers import WORKER

from node.commands import receipts as receipts_command
from node.ledger import LEDGER_FILE, Ledger


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "node-data"


@pytest.fixture
def ledger(data_dir: Path):
    ledger = Ledger.open(data_dir / LEDGER_FILE, WORKER)
    yield ledger
    ledger.close()


@pytest.fixture
def tamper(data_dir: Path) -> Callable[..., None]:
    """Edit the ledger file behind the node's back, as an attacker with file access would: drop the
    append-only triggers first, then run the statements."""
    def run(*statements: str) -> None:
        conn = sqlite3.connect(data_dir / LEDGER_FILE, isolation_level=None)
        conn.execute("DROP TRIGGER IF EXISTS receipts_append_only_u")
        conn.execute("DROP TRIGGER IF EXISTS receipts_append_only_d")
        for statement in statements:
            conn.execute(statement)
        conn.close()
    return run


@pytest.fixture
def cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run `dspark-node receipts ARGS...` through the command's own parser; (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="dspark-node")
    receipts_command.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        args = parser.parse_args(["receipts", *argv])
        code = args.func(args)
        out, err = capsys.readouterr()
        return code, out, err
    return run
