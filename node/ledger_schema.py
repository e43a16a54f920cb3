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


def open_keyed_store(path: Path, schema: str, version: bytes, key_name: str, key: bytes,
                     what: str) -> sqlite3.Connection:
    """Open (creating if needed) a receipts database with WAL + synchronous=FULL, stamped with the
    key it belongs to; refuse one stamped with another key. Serves the node's ledger and the
    gateway's client-side store (`what` names it in errors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
    except sqlite3.DatabaseError as exc:    # a directory where the file belongs, a file this user may not open
        raise LedgerError("storage", f"{path}: cannot open the {what}: {exc}") from None
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise LedgerError("storage", f"{path}: SQLite refused WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        # Before the schema is written: a file of another version (a newer node's) is refused untouched.
        _check_version(conn, path, version, what)
        # statement by statement: executescript() would COMMIT first and break the transaction
        for statement in filter(str.strip, schema.split(";\n")):
            conn.execute(statement)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (version,))
        conn.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key_name, key))
        conn.execute("COMMIT")
        stored = stored_key(conn, path, version, key_name, what)
        if stored != key:
            owner = "node" if key_name == "worker_public_key" else "client"
            raise LedgerError("wrong_key", f"{path} holds receipts of another {owner} key ({stored.hex()[:16]}...)")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LedgerError("storage", f"{path}: cannot open the {what}: {exc}") from None
    except LedgerError:
        conn.close()
        raise
    return conn


def _check_version(conn: sqlite3.Connection, path: Path, version: bytes, what: str) -> None:
    """Refuse a database stamped with another schema version; a new file (no meta table yet) passes."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is None:
        return
    found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if found is not None and found[0] != version:
        raise _wrong_schema(path, version, what, found[0])


def _wrong_schema(path: Path, version: bytes, what: str, found: object) -> LedgerError:
    stamped = found.decode(errors="replace") if isinstance(found, bytes) else found
    return LedgerError("schema", f"{path} is not a dspark-node {what} of schema version "
                                 f"{version.decode()} (found version {stamped!r})")


def stored_key(conn: sqlite3.Connection, path: Path, version: bytes, key_name: str, what: str) -> bytes:
    """The key a receipts database belongs to, after checking its schema version."""
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("schema_version") != version or key_name not in meta:
        raise _wrong_schema(path, version, what, meta.get("schema_version"))
    return meta[key_name]


def connect_writer(path: Path, public_key: bytes) -> sqlite3.Connection:
    """The node's ledger, writable; refuses a ledger of another node key."""
    return open_keyed_store(path, _SCHEMA, SCHEMA_VERSION, "worker_public_key", public_key, "ledger")


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
        if exc.sqlite_errorcode == sqlite3.SQLITE_CORRUPT:
            raise    # a SQLite file with damaged pages (truncated, overwritten): a ledger that does not verify
        raise LedgerError("storage", f"{path} is not a dspark-node ledger: {exc}") from None
    except LedgerError:
        conn.close()
        raise


def _worker_key(conn: sqlite3.Connection, path: Path) -> bytes:
    return stored_key(conn, path, SCHEMA_VERSION, "worker_public_key", "ledger")
