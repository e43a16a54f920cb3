"""The ledger's storage format and how it is opened: tables, append-only triggers, durability
settings, and the meta rows that bind a ledger file to one node key and one schema version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

LEDGER_FILE = "ledger.sqlite3"    # inside the node's data dir
SCHEMA_VERSION = b"1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    client_key BLOB NOT NULL, job_id BLOB NOT NULL, job_digest BLOB NOT NULL,
    expires_at_ms INTEGER NOT NULL, registered_at_ms INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'finished')),
    receipt_sequence INTEGER,
    PRIMARY KEY (client_key, job_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS receipts (
    sequence INTEGER PRIMARY KEY,
    client_key BLOB NOT NULL, job_id BLOB NOT NULL, digest BLOB NOT NULL UNIQUE,
    issued_at_ms INTEGER NOT NULL, outcome TEXT NOT NULL,
    output_tokens INTEGER NOT NULL, amount_micros INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    UNIQUE (client_key, job_id));
CREATE INDEX IF NOT EXISTS receipts_issued ON receipts (issued_at_ms);
CREATE TABLE IF NOT EXISTS acknowledgments (
    sequence INTEGER PRIMARY KEY REFERENCES receipts (sequence),
    acknowledged_at_ms INTEGER NOT NULL, envelope BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS receipts_append_only_u BEFORE UPDATE ON receipts
    BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
CREATE TRIGGER IF NOT EXISTS receipts_append_only_d BEFORE DELETE ON receipts
    BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
"""


class LedgerError(ValueError):
    """A ledger operation refused; `reason` is a short tag, the message says what was wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def connect_writer(path: Path, public_key: bytes) -> sqlite3.Connection:
    """Open (creating if needed) with WAL + synchronous=FULL; refuse a ledger of another key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise LedgerError("storage", f"{path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        # statement by statement: executescript() would COMMIT first and break the transaction
        for statement in filter(str.strip, _SCHEMA.split(";\n")):
            conn.execute(statement)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('worker_public_key', ?)", (public_key,))
        conn.execute("COMMIT")
        stored = _worker_key(conn, path)
        if stored != public_key:
            raise LedgerError("wrong_key", f"{path} holds receipts of another node key ({stored.hex()[:16]}...)")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LedgerError("storage", f"{path}: cannot open the ledger: {exc}") from None
    except LedgerError:
        conn.close()
        raise
    return conn


def connect_reader(path: Path) -> tuple[sqlite3.Connection, bytes]:
    """Open read-only; returns the connection and the node key the ledger belongs to."""
    if not path.is_file():
        raise LedgerError("missing", f"no ledger at {path}")
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False, timeout=10)
    try:
        return conn, _worker_key(conn, path)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LedgerError("storage", f"{path} is not a dspark-node ledger: {exc}") from None
    except LedgerError:
        conn.close()
        raise


def _worker_key(conn: sqlite3.Connection, path: Path) -> bytes:
    """The node key the ledger belongs to, after checking it is a ledger of this schema."""
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("schema_version") != SCHEMA_VERSION or "worker_public_key" not in meta:
        raise LedgerError("schema", f"{path} is not a dspark-node ledger of schema version "
                                    f"{SCHEMA_VERSION.decode()} (found {meta.get('schema_version')!r})")
    return meta["worker_public_key"]
