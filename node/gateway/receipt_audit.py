"""`dspark-node receipts verify` on a gateway's receipt store (receipt_store.py).

Each row: the receipt is signed by the worker it names and bills by the rule (check_receipt), the
digest and index columns match the stored envelope, it is for this gateway's client key, and the
stored acknowledgment is the gateway's signature over it. Across rows, per worker: two different
receipts with one sequence are proof the worker forked its ledger, and where consecutive sequences
are both held, the later one must chain to the earlier one. The client keeps only its own jobs'
receipts, so gaps between sequences are expected (other clients' jobs), not reported.
"""

from __future__ import annotations

from node.identity import IdentityError, public_key_from_peer_id
from node.ledger import DamagedRow, ReceiptRow
from node.ledger_audit import (AuditReport, Problem, RowProblem, check_columns, check_stored_acknowledgment,
                               check_stored_receipt)
from node.gateway.receipt_store import ReceiptStore


def _check_row(worker: str, row: ReceiptRow, client_key: bytes) -> bytes:
    """Checks one row alone; returns the receipt's previous_receipt_digest."""
    try:
        worker_key = public_key_from_peer_id(worker)
    except IdentityError as exc:
        raise RowProblem(str(exc)) from None
    envelope, receipt = check_stored_receipt(row, worker_key)
    check_stored_acknowledgment(row.ack_bytes or b"", envelope, receipt)
    if receipt.sequence != row.sequence:
        raise RowProblem(f"the signed receipt says sequence {receipt.sequence}, the row {row.sequence}")
    if receipt.client_public_key != client_key:
        raise RowProblem("the receipt is for another client key than this gateway's")
    check_columns(row, receipt)
    return receipt.previous_receipt_digest


def audit_store(store: ReceiptStore, max_problems: int = 50) -> AuditReport:
    report = AuditReport()
    # worker -> sequence -> (receipt digest, its previous_receipt_digest)
    seen: dict[str, dict[int, tuple[bytes, bytes]]] = {}

    def problem(row: ReceiptRow, worker: str, message: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(Problem(row.sequence, f"worker {worker}: job {row.job_id.hex()}: {message}"))

    for worker, row in store.rows():
        report.checked += 1
        try:
            previous = _check_row(worker, row, store.client_public_key)
        except (RowProblem, DamagedRow) as exc:
            problem(row, worker, str(exc))
            continue
        report.amount_micros += row.amount_micros
        report.acknowledged += 1
        report.head_digest = row.digest
        chain = seen.setdefault(worker, {})
        other = chain.get(row.sequence)
        if other is not None and other[0] != row.digest:
            problem(row, worker, "two different receipts signed with this sequence: the worker forked its ledger")
        chain[row.sequence] = (row.digest, previous)
    for worker, chain in seen.items():
        for sequence, (_, previous) in sorted(chain.items()):
            before = chain.get(sequence - 1)
            if before is not None and previous != before[0]:
                report.problems.append(Problem(sequence, f"worker {worker}: previous_receipt_digest does not "
                                                         f"match its receipt {sequence - 1} (chain broken)"))
    return report
