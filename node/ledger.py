"""The billing ledger: one SQLite file holding jobs (the persistent replay cache), signed receipts in
an append-only hash chain, and the clients' acknowledgments beside them.

Durability: WAL with synchronous=FULL, and a receipt row is inserted in the same transaction that
marks its job finished, so after any crash a job is either 'running' (and `recover` bills what it
produced: nothing) or 'finished' with its receipt. Calls block (SQLite): async callers use
`asyncio.to_thread`; one lock serializes them because a sqlite3 connection has one transaction.
"""

from __future__ import annotations

import hashlib
import heapq
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from google.protobuf.message import DecodeError

from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.receipt_pb2 import Acknowledgment, Receipt
from engine.api import RequestStats
from node.envelope import EnvelopeError, digest, open_envelope
from node.identity import Identity
from node.ledger_schema import LEDGER_FILE, LedgerError, connect_reader, connect_writer  # noqa: F401 (re-exported)
from node.receipts import (GENESIS_DIGEST, JobOutcome, ReceiptError, build_receipt, check_acknowledgment,
                           sign_receipt)

_ROW_COLUMNS = ("r.sequence, r.client_key, r.job_id, r.digest, r.issued_at_ms, r.outcome, r.output_tokens, "
                "r.amount_micros, r.envelope, a.envelope")
_ROW_FROM = "receipts r LEFT JOIN acknowledgments a ON a.sequence = r.sequence"
TOP_CLIENTS = 10     # the clients Ledger.totals names; the rest are summed
# An Acknowledgment's fields take ~100 bytes. The ledger keeps a client's acknowledgment for ever, so
# one padded with fields the node does not know (up to the 1 MiB of any payload) is refused.
MAX_ACK_PAYLOAD_BYTES = 1024


def _now_ms() -> int:
    return int(time.time() * 1000)


class DamagedRow(LedgerError):
    """A stored value the node never writes (the file was edited behind its back): the ledger does
    not verify. Readers report it as such (`receipts` exit 1), not as a refused request."""


def unreadable(exc: sqlite3.Error) -> str:
    """What to say when a ledger file that opened cannot be read as the node wrote it (a dropped
    table, TEXT that does not decode, a lock held too long). SQLite's decode error quotes the
    undecodable bytes themselves; they are cut, not shown."""
    return f"the ledger cannot be read ({str(exc).partition(' with text ')[0]})"


_STORED_AS = {str: "text", int: "an integer", float: "a real number", type(None): "NULL"}


def stored_blob(value: object, what: str) -> bytes:
    """`value` as read from a BLOB column. SQLite types values, not columns, so a hand edit can leave
    TEXT (or a number) there, which protobuf and hashlib refuse with a TypeError, not a parse error."""
    if not isinstance(value, bytes):
        raise DamagedRow("not_bytes", f"the stored {what} is {_STORED_AS.get(type(value), type(value).__name__)}, "
                                      "not bytes")
    return value


@dataclass(frozen=True)
class ReceiptRow:
    """One receipt as stored: indexed columns beside the exact signed envelope bytes."""
    sequence: int
    client_key: bytes
    job_id: bytes
    digest: bytes
    issued_at_ms: int
    outcome: str
    output_tokens: int
    amount_micros: int
    envelope_bytes: bytes
    ack_bytes: bytes | None

    def envelope(self) -> Envelope:
        """The stored envelope, parsed; DamagedRow (naming the sequence) if it is not one."""
        try:
            return Envelope.FromString(stored_blob(self.envelope_bytes, "envelope"))
        except DamagedRow as exc:
            raise DamagedRow(exc.reason, f"sequence {self.sequence}: {exc}") from None
        except DecodeError:
            raise DamagedRow("not_envelope", f"sequence {self.sequence}: the stored envelope is not a valid "
                                             "Envelope") from None

    def receipt(self) -> Receipt:
        """The receipt as stored, not re-verified (audits use node.ledger_audit)."""
        try:
            return Receipt.FromString(self.envelope().payload)
        except DecodeError:
            raise DamagedRow("not_receipt", f"sequence {self.sequence}: the stored envelope does not hold a "
                                            "Receipt") from None


@dataclass(frozen=True)
class LedgerTotals:
    receipts: int
    amount_micros: int
    output_tokens: int
    acknowledged: int
    per_client_micros: dict[str, int]    # client key hex -> amount, of the clients billed most
    other_clients: int                   # the clients not in per_client_micros
    other_clients_micros: int            # and what they were billed in all
    recent: tuple[ReceiptRow, ...]       # newest first


@dataclass
class _Tally:
    """Running sums of the receipts up to `sequence` (see Ledger.totals)."""
    sequence: int = 0
    receipts: int = 0
    amount_micros: int = 0
    output_tokens: int = 0
    per_client_micros: dict[str, int] = field(default_factory=dict)

    def add(self, sequence: int, client: str, amount: int, tokens: int) -> None:
        self.sequence, self.receipts = sequence, self.receipts + 1
        self.amount_micros += amount
        self.output_tokens += tokens
        self.per_client_micros[client] = self.per_client_micros.get(client, 0) + amount


class Ledger:
    def __init__(self, conn: sqlite3.Connection, identity: Identity | None, worker_public_key: bytes):
        self._conn = conn
        self._identity = identity        # None: opened read-only (CLI, audits)
        self._lock = threading.Lock()
        self._tally = _Tally()
        self.worker_public_key = worker_public_key

    @classmethod
    def open(cls, path: Path, identity: Identity) -> Ledger:
        """The node's writable ledger (created if absent); refuses one of another node key."""
        return cls(connect_writer(path, identity.public_key), identity, identity.public_key)

    @classmethod
    def open_readonly(cls, path: Path) -> Ledger:
        """For audits and the CLI: consistent WAL snapshots, safe while the daemon writes."""
        conn, worker_key = connect_reader(path)
        return cls(conn, None, worker_key)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _writer(self) -> Identity:
        if self._identity is None:
            raise LedgerError("read_only", "this ledger was opened read-only")
        return self._identity

    # --- the service's calls ---------------------------------------------------------------

    def register_job(self, client_key: bytes, job_id: bytes, job_digest: bytes, expires_at_ms: int) -> bool:
        """Record an admitted job as 'running'; False if this client used this job_id before."""
        self._writer()
        if len(client_key) != 32 or not 1 <= len(job_id) <= 64 or len(job_digest) != 32:
            raise LedgerError("bad_job", "client key must be 32 bytes, job_id 1..64, job digest 32")
        with self._lock:
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO jobs (client_key, job_id, job_digest, expires_at_ms, registered_at_ms,"
                " status) VALUES (?, ?, ?, ?, ?, 'running')",
                (client_key, job_id, job_digest, int(expires_at_ms), _now_ms()))
            return cur.rowcount == 1

    def forget_job(self, client_key: bytes, job_id: bytes) -> None:
        """Undo register_job for a job that never started: its id is unused again, as a refused
        job's is. A job with a receipt is never forgotten."""
        self._writer()
        with self._lock:
            self._conn.execute("DELETE FROM jobs WHERE client_key = ? AND job_id = ? AND status = 'running'",
                               (client_key, job_id))

    def finish_job(self, outcome: JobOutcome) -> Envelope:
        """Sign the job's receipt, chain it, and mark the job finished, in one transaction.
        Idempotent: a job that already has a receipt gets that receipt back, unchanged."""
        identity = self._writer()
        key = (outcome.client_key, outcome.job_id)
        with self._lock, self._transaction():
            existing = self._conn.execute(
                "SELECT envelope FROM receipts WHERE client_key = ? AND job_id = ?", key).fetchone()
            if existing:
                return Envelope.FromString(existing[0])
            job = self._conn.execute(
                "SELECT job_digest FROM jobs WHERE client_key = ? AND job_id = ?", key).fetchone()
            if job is None:
                raise LedgerError("unknown_job", f"job {outcome.job_id.hex()} was never registered")
            if job[0] != outcome.job_digest:
                raise LedgerError("digest_mismatch", f"job {outcome.job_id.hex()} was registered with "
                                                     "another job digest")
            tail = self._conn.execute("SELECT sequence, digest, issued_at_ms FROM receipts ORDER BY sequence DESC"
                                      " LIMIT 1").fetchone()
            sequence, previous = (tail[0] + 1, tail[1]) if tail else (1, GENESIS_DIGEST)
            # Never before the previous receipt: billing periods are cut on issued_at_ms, and a clock
            # stepped back would put this receipt in a period already exported and settled.
            now = max(_now_ms(), tail[2]) if tail else _now_ms()
            receipt = build_receipt(outcome, identity.peer_id, sequence, previous, now)
            envelope = sign_receipt(identity, receipt)
            self._conn.execute(
                "INSERT INTO receipts (sequence, client_key, job_id, digest, issued_at_ms, outcome,"
                " output_tokens, amount_micros, envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sequence, *key, digest(envelope), now, receipt.outcome, receipt.output_tokens,
                 receipt.amount_micros, envelope.SerializeToString(deterministic=True)))
            self._conn.execute(
                "UPDATE jobs SET status = 'finished', receipt_sequence = ? WHERE client_key = ? AND job_id = ?",
                (sequence, *key))
            return envelope

    def receipt(self, client_key: bytes, job_id: bytes) -> Envelope | None:
        with self._lock:
            row = self._conn.execute("SELECT envelope FROM receipts WHERE client_key = ? AND job_id = ?",
                                     (client_key, job_id)).fetchone()
        return Envelope.FromString(row[0]) if row else None

    def acknowledge(self, ack: Envelope) -> int:
        """Store the client's countersignature beside the receipt it names; returns its sequence.
        A repeated acknowledgment of the same receipt keeps the first one stored."""
        self._writer()
        try:
            receipt_digest = open_envelope(ack, Acknowledgment, MAX_ACK_PAYLOAD_BYTES).receipt_digest
        except EnvelopeError as exc:
            raise LedgerError(exc.reason, f"acknowledgment refused: {exc}") from None
        with self._lock, self._transaction():
            row = self._conn.execute("SELECT sequence, envelope FROM receipts WHERE digest = ?",
                                     (receipt_digest,)).fetchone()
            if row is None:
                raise LedgerError("unknown_receipt", "acknowledgment names a receipt this ledger does not hold")
            receipt_envelope = Envelope.FromString(row[1])
            try:
                check_acknowledgment(ack, receipt_envelope, Receipt.FromString(receipt_envelope.payload))
            except ReceiptError as exc:
                raise LedgerError(exc.reason, str(exc)) from None
            # Only what the signature covers, and the signer: fields of the envelope the node does not
            # know (a client's padding, up to gRPC's 2 MiB) are not the client's acknowledgment.
            signed = Envelope(payload_type=ack.payload_type, payload=ack.payload, public_key=ack.public_key,
                              signature=ack.signature)
            self._conn.execute("INSERT OR IGNORE INTO acknowledgments VALUES (?, ?, ?)",
                               (row[0], _now_ms(), signed.SerializeToString(deterministic=True)))
            return row[0]

    def recover(self) -> int:
        """At start: jobs a crash left 'running' get a 'failed' receipt for what they produced.
        Their tokens were never confirmed to the client, so that is zero tokens, zero amount."""
        with self._lock:
            running = self._conn.execute(
                "SELECT client_key, job_id, job_digest FROM jobs WHERE status = 'running'").fetchall()
        for client_key, job_id, job_digest in running:
            self.finish_job(JobOutcome(
                job_id=job_id, client_key=client_key, job_digest=job_digest, model="", model_digest=b"",
                drafter="", drafter_digest=b"", outcome="failed", stats=RequestStats(), output_ids=(),
                device="", price_per_mtok_micros=0, price_per_gpu_second_micros=0))
        return len(running)

    def totals(self, recent: int = 20) -> LedgerTotals:
        """Counts for the dashboard's earnings (/api/earnings; the Prometheus counters come from job
        events, node/metrics.py). Receipts are append-only, so the sums carry on from the last call
        over the new rows only (a dashboard poll costs the same at 100k receipts). Only the
        TOP_CLIENTS billed most are named: a node whose clients sign with fresh keys has one per
        job, and 200k of them made each poll a 15 MB answer that held the event loop for 1.3 s."""
        with self._lock:
            tally = self._tally
            for sequence, client_key, amount, tokens in self._conn.execute(
                    "SELECT sequence, client_key, amount_micros, output_tokens FROM receipts WHERE sequence > ?"
                    " ORDER BY sequence", (tally.sequence,)):
                tally.add(sequence, client_key.hex(), amount, tokens)
            acked = self._conn.execute("SELECT COUNT(*) FROM acknowledgments").fetchone()[0]
            clients = list(tally.per_client_micros.items())
            receipts, billed, output_tokens = tally.receipts, tally.amount_micros, tally.output_tokens
        top = dict(heapq.nlargest(TOP_CLIENTS, clients, key=lambda client: client[1]))
        return LedgerTotals(receipts, billed, output_tokens, acked, top, len(clients) - len(top),
                            billed - sum(top.values()), tuple(self.latest(recent)))

    # --- reads for audits, exports and the CLI ----------------------------------------------

    def rows(self, since_ms: int | None = None, until_ms: int | None = None,
             page: int = 2000) -> Iterator[ReceiptRow]:
        """Receipts in sequence order, optionally those issued in [since_ms, until_ms)."""
        after = 0
        lo, hi = since_ms if since_ms is not None else -2**63, until_ms if until_ms is not None else 2**63 - 1
        while True:
            with self._lock:
                batch = self._conn.execute(
                    f"SELECT {_ROW_COLUMNS} FROM {_ROW_FROM} WHERE r.sequence > ? AND r.issued_at_ms >= ?"
                    " AND r.issued_at_ms < ? ORDER BY r.sequence LIMIT ?", (after, lo, hi, page)).fetchall()
            yield from (ReceiptRow(*r) for r in batch)
            if len(batch) < page:
                return
            after = batch[-1][0]

    def latest(self, limit: int, client_key: bytes | None = None) -> list[ReceiptRow]:
        where, params = ("WHERE r.client_key = ?", (client_key, limit)) if client_key else ("", (limit,))
        with self._lock:
            return [ReceiptRow(*r) for r in self._conn.execute(
                f"SELECT {_ROW_COLUMNS} FROM {_ROW_FROM} {where} ORDER BY r.sequence DESC LIMIT ?", params)]

    def find(self, job_id: bytes, client_key: bytes | None = None) -> list[ReceiptRow]:
        query = f"SELECT {_ROW_COLUMNS} FROM {_ROW_FROM} WHERE r.job_id = ?"
        params: tuple = (job_id,)
        if client_key is not None:
            query, params = query + " AND r.client_key = ?", (job_id, client_key)
        with self._lock:
            return [ReceiptRow(*r) for r in self._conn.execute(query + " ORDER BY r.sequence", params)]

    def envelope_digest(self, sequence: int) -> bytes | None:
        """sha256 of the stored envelope of receipt `sequence` (GENESIS_DIGEST for 0), from its bytes,
        not its digest column; None if there is no such row."""
        if sequence == 0:
            return GENESIS_DIGEST
        with self._lock:
            row = self._conn.execute("SELECT envelope FROM receipts WHERE sequence = ?", (sequence,)).fetchone()
        return None if row is None else hashlib.sha256(stored_blob(row[0], f"envelope of sequence {sequence}")).digest()

    def job_problems(self) -> list[str]:
        """Jobs marked finished whose receipt is missing or is another job's, and receipts of jobs
        the ledger never registered or did not mark finished."""
        with self._lock:
            missing = self._conn.execute(
                "SELECT j.job_id, j.receipt_sequence FROM jobs j LEFT JOIN receipts r ON r.client_key ="
                " j.client_key AND r.job_id = j.job_id AND r.sequence = j.receipt_sequence"
                " WHERE j.status = 'finished' AND r.sequence IS NULL ORDER BY j.receipt_sequence").fetchall()
            orphans = self._conn.execute(
                "SELECT r.sequence, r.job_id FROM receipts r LEFT JOIN jobs j ON j.client_key = r.client_key"
                " AND j.job_id = r.job_id WHERE j.status IS NOT 'finished' ORDER BY r.sequence").fetchall()
        return ([f"job {job_id.hex()} is marked finished but its receipt (sequence {seq}) is missing"
                 for job_id, seq in missing]
                + [f"sequence {seq}: receipt of job {job_id.hex()}, which the jobs table does not show finished"
                   for seq, job_id in orphans])

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE takes the write lock before the chain tail is read, so two writers (even
        in two processes) can never give out the same sequence."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
