"""`receipts verify`: check a whole ledger and name the first row that is wrong.

Every receipt must be signed by the worker key, bill by the rule, carry the sequence of its row
(1, 2, 3... with no gap) and the digest of the previous row's envelope; the row's indexed columns
must equal what the signed receipt says (an edited `amount_micros` column is caught here); an
acknowledgment must be the receipt client's signature over that receipt; and the jobs table must
agree (no finished job without its receipt). What this cannot catch alone: the newest receipts
deleted together with their job rows, or a chain rebuilt with the worker's own key. Clients' copies,
their acknowledgments and published period Merkle roots are the defence there (docs/receipts.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.receipt_pb2 import Receipt
from node.ledger import DamagedRow, Ledger, ReceiptRow, stored_blob
from node.receipts import GENESIS_DIGEST, ReceiptError, check_acknowledgment, check_receipt


@dataclass(frozen=True)
class Problem:
    sequence: int | None      # the row's sequence column; None for a jobs-table problem
    message: str

    def __str__(self) -> str:
        return self.message if self.sequence is None else f"sequence {self.sequence}: {self.message}"


@dataclass
class AuditReport:
    checked: int = 0
    acknowledged: int = 0
    amount_micros: int = 0
    head_digest: bytes = GENESIS_DIGEST
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class RowProblem(Exception):
    """What is wrong with one stored receipt row (the ledger's, or a gateway's receipt store's)."""


def check_columns(row: ReceiptRow, receipt: Receipt) -> None:
    signed = {"client_key": receipt.client_public_key, "job_id": receipt.job_id,
              "issued_at_ms": receipt.issued_at_ms, "outcome": receipt.outcome,
              "output_tokens": receipt.output_tokens, "amount_micros": receipt.amount_micros}
    for name, value in signed.items():
        stored = getattr(row, name)
        if stored != value:
            shown = (stored.hex(), value.hex()) if isinstance(value, bytes) else (stored, value)
            raise RowProblem(f"{name} column {shown[0]} differs from the signed receipt's {shown[1]}")


def check_stored_receipt(row: ReceiptRow, worker_public_key: bytes) -> tuple[Envelope, Receipt]:
    """The row's envelope and the receipt it carries, once the digest column matches the stored bytes
    and the receipt is the worker's signature over a charge by the billing rule."""
    envelope_bytes = stored_blob(row.envelope_bytes, "envelope")
    if hashlib.sha256(envelope_bytes).digest() != row.digest:
        raise RowProblem("digest column does not match the stored envelope (envelope edited?)")
    try:
        envelope = Envelope.FromString(envelope_bytes)
        return envelope, check_receipt(envelope, worker_public_key)
    except DecodeError:
        raise RowProblem("the stored envelope is not a valid Envelope") from None
    except ReceiptError as exc:
        raise RowProblem(str(exc)) from None


def check_stored_acknowledgment(ack_bytes: bytes, envelope: Envelope, receipt: Receipt) -> None:
    try:
        check_acknowledgment(Envelope.FromString(stored_blob(ack_bytes, "acknowledgment")), envelope, receipt)
    except (DecodeError, ReceiptError) as exc:
        raise RowProblem(f"acknowledgment is invalid: {exc}") from None


def check_row(row: ReceiptRow, expected_sequence: int, previous_digest: bytes, worker_public_key: bytes) -> Receipt:
    """Everything one row must hold, given the sequence and envelope digest of the row before it."""
    if row.sequence != expected_sequence:  # rows come in sequence order, so this is a gap
        gap = (f"receipt {expected_sequence} is" if row.sequence == expected_sequence + 1
               else f"receipts {expected_sequence}..{row.sequence - 1} are")
        raise RowProblem(f"expected sequence {expected_sequence}: {gap} missing (deleted?)")
    envelope, receipt = check_stored_receipt(row, worker_public_key)
    if receipt.sequence != row.sequence:
        raise RowProblem(f"the signed receipt says sequence {receipt.sequence} (rows reordered or swapped)")
    if receipt.previous_receipt_digest != previous_digest:
        raise RowProblem("previous_receipt_digest does not match the previous receipt (chain broken)")
    check_columns(row, receipt)
    if row.ack_bytes is not None:
        check_stored_acknowledgment(row.ack_bytes, envelope, receipt)
    return receipt


def audit_ledger(ledger: Ledger, worker_public_key: bytes | None = None, max_problems: int = 50) -> AuditReport:
    """Check every row in sequence order against `worker_public_key` (default: the ledger's own)."""
    key = worker_public_key if worker_public_key is not None else ledger.worker_public_key
    report = AuditReport()
    expected, previous = 1, GENESIS_DIGEST
    for row in ledger.rows():
        report.checked += 1
        try:
            receipt = check_row(row, expected, previous, key)
            report.amount_micros += receipt.amount_micros
            report.acknowledged += row.ack_bytes is not None
        except (RowProblem, DamagedRow) as exc:
            if len(report.problems) < max_problems:
                report.problems.append(Problem(row.sequence, f"job {row.job_id.hex()}: {exc}"))
        # Continue from what the row holds, so one bad row is reported once, not at every later row
        # (TEXT as the UTF-8 SQLite keeps: an envelope cast to TEXT still chains to the next row).
        held = row.envelope_bytes if isinstance(row.envelope_bytes, bytes) else str(row.envelope_bytes).encode()
        expected, previous = row.sequence + 1, hashlib.sha256(held).digest()
    report.head_digest = previous
    report.problems.extend(Problem(None, message) for message in ledger.job_problems()[:max_problems])
    return report
