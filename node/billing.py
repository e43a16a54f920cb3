"""Billing exports: a period's receipts as JSON lines or CSV, totals per client, and the period's
Merkle root (node/merkle.py) with inclusion proofs, for a market's billing system or a settlement
contract. Every exported receipt is re-verified first; amounts come from the signed receipts, never
from the ledger's index columns.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, TextIO

from dspark.v1.receipt_pb2 import Receipt
from node.ledger import Ledger, ReceiptRow
from node.merkle import inclusion_proof, merkle_root, verify_inclusion
from node.receipts import ReceiptError, check_receipt

MERKLE_RULE = "rfc6962-sha256"   # leaf = SHA256(0x00 || receipt digest), node = SHA256(0x01 || l || r)
_RECEIPT_FIELDS = ("sequence", "issued_at", "issued_at_ms", "client", "job_id", "worker_peer_id", "model",
                   "drafter", "outcome", "prompt_tokens", "output_tokens", "rounds", "drafted_tokens",
                   "verified_tokens", "accepted_tokens", "tau", "gpu_seconds", "tokens_per_second", "device",
                   "price_per_mtok_micros", "price_per_gpu_second_micros", "amount_micros", "output_digest",
                   "receipt_digest", "acknowledged", "envelope")
_TOTAL_FIELDS = ("client", "receipts", "output_tokens", "amount_micros", "acknowledged")
_PERIOD_FIELDS = ("since_ms", "until_ms", "receipts", "amount_micros", "first_sequence", "last_sequence",
                  "worker_peer_id", "merkle_rule", "merkle_root")


class BillingError(ValueError):
    """An export or proof that cannot be produced or does not hold; the message says why."""


def parse_time_ms(text: str) -> int:
    """Unix milliseconds, or an ISO 8601 date / date-time (UTC when no offset is given)."""
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BillingError(f"{text!r} is neither unix milliseconds nor an ISO 8601 date or time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def iso_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class PeriodReceipts:
    """A period's verified receipts in sequence order, with the leaves of its Merkle tree."""
    since_ms: int | None
    until_ms: int | None
    worker_peer_id: str
    items: tuple[tuple[ReceiptRow, Receipt], ...]

    @property
    def leaves(self) -> list[bytes]:
        return [row.digest for row, _ in self.items]


def load_period(ledger: Ledger, since_ms: int | None, until_ms: int | None) -> PeriodReceipts:
    items = []
    for row in ledger.rows(since_ms, until_ms):
        try:
            receipt = check_receipt(row.envelope(), ledger.worker_public_key)
        except ReceiptError as exc:
            raise BillingError(f"sequence {row.sequence}: {exc}; run `receipts verify`") from None
        items.append((row, receipt))
    worker = items[0][1].worker_peer_id if items else ""
    return PeriodReceipts(since_ms, until_ms, worker, tuple(items))


def receipt_record(row: ReceiptRow, r: Receipt) -> dict[str, Any]:
    return {
        "sequence": r.sequence, "issued_at": iso_time(r.issued_at_ms), "issued_at_ms": r.issued_at_ms,
        "client": r.client_public_key.hex(), "job_id": r.job_id.hex(), "worker_peer_id": r.worker_peer_id,
        "model": r.model, "drafter": r.drafter, "outcome": r.outcome, "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens, "rounds": r.rounds, "drafted_tokens": r.drafted_tokens,
        "verified_tokens": r.verified_tokens, "accepted_tokens": r.accepted_tokens, "tau": r.tau,
        "gpu_seconds": r.gpu_seconds, "tokens_per_second": r.tokens_per_second, "device": r.device,
        "price_per_mtok_micros": r.price_per_mtok_micros,
        "price_per_gpu_second_micros": r.price_per_gpu_second_micros, "amount_micros": r.amount_micros,
        "output_digest": r.output_digest.hex(), "receipt_digest": row.digest.hex(),
        "acknowledged": row.ack_bytes is not None,
        "envelope": base64.b64encode(row.envelope_bytes).decode(),  # lets the reader re-verify
    }


def summary_records(period: PeriodReceipts) -> list[dict[str, Any]]:
    """One 'client_total' record per client (by key hex), then one 'period' record."""
    totals: dict[str, dict[str, Any]] = {}
    for row, r in period.items:
        t = totals.setdefault(r.client_public_key.hex(), dict.fromkeys(_TOTAL_FIELDS[1:], 0))
        t["receipts"] += 1
        t["output_tokens"] += r.output_tokens
        t["amount_micros"] += r.amount_micros
        t["acknowledged"] += row.ack_bytes is not None
    records = [{"record": "client_total", "client": client, **t} for client, t in sorted(totals.items())]
    sequences = [r.sequence for _, r in period.items]
    records.append({
        "record": "period", "since_ms": period.since_ms, "until_ms": period.until_ms,
        "receipts": len(period.items), "amount_micros": sum(r.amount_micros for _, r in period.items),
        "first_sequence": min(sequences, default=None), "last_sequence": max(sequences, default=None),
        "worker_peer_id": period.worker_peer_id, "merkle_rule": MERKLE_RULE,
        "merkle_root": merkle_root(period.leaves).hex()})
    return records


def write_export(period: PeriodReceipts, fmt: str, out: TextIO) -> dict[str, Any]:
    """Write receipts then totals then the period record; returns the period record."""
    records: Iterable[dict[str, Any]] = [{"record": "receipt", **receipt_record(row, r)} for row, r in period.items]
    summary = summary_records(period)
    if fmt == "jsonl":
        for record in [*records, *summary]:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
    elif fmt == "csv":
        # One table: a 'record' column says which fields of a row are filled.
        columns = ["record", *dict.fromkeys(_RECEIPT_FIELDS + _TOTAL_FIELDS + _PERIOD_FIELDS)]
        writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows([*records, *summary])
    else:
        raise BillingError(f"unknown export format {fmt!r} (jsonl or csv)")
    return summary[-1]


def period_proof(period: PeriodReceipts, job_id: bytes, client_key: bytes | None) -> dict[str, Any]:
    """Inclusion proof of one job's receipt in the period's Merkle tree, as a JSON-able dict."""
    matches = [i for i, (_, r) in enumerate(period.items)
               if r.job_id == job_id and (client_key is None or r.client_public_key == client_key)]
    if not matches:
        raise BillingError(f"no receipt for job {job_id.hex()} in this period")
    if len(matches) > 1:
        raise BillingError(f"job id {job_id.hex()} was used by {len(matches)} clients; pass --client")
    row, receipt = period.items[matches[0]]
    proof = inclusion_proof(period.leaves, matches[0])
    return {"merkle_rule": MERKLE_RULE, "job_id": job_id.hex(), "client": receipt.client_public_key.hex(),
            "sequence": receipt.sequence, "since_ms": period.since_ms, "until_ms": period.until_ms,
            "receipt_digest": proof.leaf.hex(), "leaf_index": proof.leaf_index, "tree_size": proof.tree_size,
            "path": [p.hex() for p in proof.path], "merkle_root": proof.root.hex(),
            "envelope": base64.b64encode(row.envelope_bytes).decode()}


def check_proof(proof: dict[str, Any], expected_root: bytes | None = None) -> None:
    """Raise BillingError unless `proof` (from `period_proof`) holds, against `expected_root` if
    given (a root published for the period) or else the root it carries."""
    try:
        if proof["merkle_rule"] != MERKLE_RULE:
            raise BillingError(f"unknown Merkle rule {proof['merkle_rule']!r}")
        leaf = bytes.fromhex(proof["receipt_digest"])
        path = [bytes.fromhex(p) for p in proof["path"]]
        root = bytes.fromhex(proof["merkle_root"])
        index, size = int(proof["leaf_index"]), int(proof["tree_size"])
        envelope = base64.b64decode(proof["envelope"], validate=True) if "envelope" in proof else None
    except (KeyError, TypeError, ValueError) as exc:
        raise BillingError(f"malformed proof: {exc!r}") from None
    if envelope is not None and hashlib.sha256(envelope).digest() != leaf:
        raise BillingError("receipt_digest is not the digest of the receipt envelope the proof carries")
    if expected_root is not None and expected_root != root:
        raise BillingError("the proof is for another root than the one expected")
    if not verify_inclusion(leaf, index, size, path, root):
        raise BillingError(f"the path does not lead from leaf {index} of {size} to the root")
