"""The gateway's client-side ledger: the receipts workers signed for its jobs, each beside the
gateway's own acknowledgment, and what every API key has spent.

A worker's ledger (node/ledger.py) is one hash chain signed by one key; this store holds receipts
of many workers, so it is its own file (`client-receipts.sqlite3` in the gateway's data dir) with
its own schema. It serves the reads `dspark-node receipts list|show|verify` make (rows come out as
node.ledger.ReceiptRow, `sequence` being the worker's). Rows are append-only (triggers refuse
UPDATE and DELETE) and each is written with its acknowledgment in one transaction. Calls block
(SQLite): async callers use `asyncio.to_thread`.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from pathlib import Path

from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.receipt_pb2 import Receipt
from node.envelope import digest
from node.ledger import ReceiptRow
from node.ledger_schema import LedgerError, open_keyed_store, stored_key

STORE_FILE = "client-receipts.sqlite3"
SCHEMA_VERSION = b"client-1"
LOCAL_KEY = "local"     # spending account of requests made without a gateway API key (loopback)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    worker_peer_id TEXT NOT NULL, sequence INTEGER NOT NULL,
    client_key BLOB NOT NULL, job_id BLOB NOT NULL, digest BLOB NOT NULL UNIQUE,
    issued_at_ms INTEGER NOT NULL, outcome TEXT NOT NULL,
    output_tokens INTEGER NOT NULL, amount_micros INTEGER NOT NULL,
    envelope BLOB NOT NULL, ack BLOB NOT NULL,
    account TEXT NOT NULL, stored_at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS receipts_account ON receipts (account);
CREATE INDEX IF NOT EXISTS receipts_job ON receipts (job_id);
CREATE TRIGGER IF NOT EXISTS receipts_append_only_u BEFORE UPDATE ON receipts
    BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END;
CREATE TRIGGER IF NOT EXISTS receipts_append_only_d BEFORE DELETE ON receipts
    BEGIN SELECT RAISE(ABORT, 'receipts are append-only'); END
"""
_COLUMNS = ("sequence, client_key, job_id, digest, issued_at_ms, outcome, output_tokens, amount_micros, "
            "envelope, ack")


def account_of(api_key: str | None) -> str:
    """The spending account of a gateway API key: a digest, so the store never holds the key."""
    return LOCAL_KEY if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()[:32]


class ReceiptStore:
    def __init__(self, conn: sqlite3.Connection, client_public_key: bytes, writable: bool):
        self._conn = conn
        self._lock = threading.Lock()
        self._writable = writable
        self.client_public_key = client_public_key

    @classmethod
    def open(cls, path: Path, client_public_key: bytes) -> ReceiptStore:
        """The gateway's writable store (created if absent); refuses one of another client key."""
        conn = open_keyed_store(path, _SCHEMA, SCHEMA_VERSION, "client_public_key", client_public_key,
                                "receipt store")
        return cls(conn, client_public_key, writable=True)

    @classmethod
    def open_readonly(cls, path: Path) -> ReceiptStore:
        if not path.is_file():
            raise LedgerError("missing", f"no receipt store at {path}")
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=10)
        try:
            return cls(conn, _client_key(conn, path), writable=False)
        except (sqlite3.DatabaseError, LedgerError) as exc:
            conn.close()
            raise LedgerError("storage", f"{path} is not a dspark-node receipt store: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add(self, envelope: Envelope, receipt: Receipt, ack: Envelope, account: str) -> None:
        """Keep a verified receipt and the acknowledgment the gateway signed for it."""
        if not self._writable:
            raise LedgerError("read_only", "this receipt store was opened read-only")
        with self._lock:
            self._conn.execute(
                f"INSERT INTO receipts (worker_peer_id, {_COLUMNS}, account, stored_at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (receipt.worker_peer_id, receipt.sequence, receipt.client_public_key, receipt.job_id,
                 digest(envelope), receipt.issued_at_ms, receipt.outcome, receipt.output_tokens,
                 receipt.amount_micros, envelope.SerializeToString(deterministic=True),
                 ack.SerializeToString(deterministic=True), account, int(time.time() * 1000)))

    def spent(self, account: str) -> int:
        """Micro-units billed to `account` by the receipts kept (persisted across restarts)."""
        with self._lock:
            return self._conn.execute("SELECT COALESCE(SUM(amount_micros), 0) FROM receipts WHERE account = ?",
                                      (account,)).fetchone()[0]

    # --- the reads of `dspark-node receipts` ------------------------------------------------

    def rows(self) -> list[tuple[str, ReceiptRow]]:
        """(worker peer ID, row), in the order they were stored."""
        with self._lock:
            found = self._conn.execute(f"SELECT worker_peer_id, {_COLUMNS} FROM receipts ORDER BY id").fetchall()
        return [(r[0], ReceiptRow(*r[1:])) for r in found]

    def latest(self, limit: int, client_key: bytes | None = None) -> list[ReceiptRow]:
        where, params = ("WHERE client_key = ?", (client_key, limit)) if client_key else ("", (limit,))
        with self._lock:
            return [ReceiptRow(*r) for r in self._conn.execute(
                f"SELECT {_COLUMNS} FROM receipts {where} ORDER BY id DESC LIMIT ?", params)]

    def find(self, job_id: bytes, client_key: bytes | None = None) -> list[ReceiptRow]:
        query, params = f"SELECT {_COLUMNS} FROM receipts WHERE job_id = ?", (job_id,)
        if client_key is not None:
            query, params = query + " AND client_key = ?", (job_id, client_key)
        with self._lock:
            return [ReceiptRow(*r) for r in self._conn.execute(query + " ORDER BY id", params)]


def _client_key(conn: sqlite3.Connection, path: Path) -> bytes:
    return stored_key(conn, path, SCHEMA_VERSION, "client_public_key", "receipt store")
