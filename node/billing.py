"""Billing exports: a period's receipts as JSON lines or CSV, totals per client, and the period's
Merkle root (node/merkle.py) with inclusion proofs, for a market's billing system or a settlement
contract. Every exported receipt is re-verified as it is read; amounts come from the signed receipts,
never from the ledger's index columns. Exports stream: a failure midway leaves a partial output,
which is why `receipts export --output` writes to a temporary file and renames it when complete.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator, TextIO

from google.protobuf.message import DecodeError

from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.receipt_pb2 import Receipt
from node.identity import IdentityError, public_key_from_peer_id
from node.ledger import DamagedRow, Ledger, ReceiptRow
from node.ledger_audit import RowProblem, check_row
from node.merkle import RootBuilder, inclusion_proof, verify_inclusion
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


class UnverifiedReceipt(BillingError):
    """A stored receipt does not verify (the ledger is damaged or was edited): the export stops."""


# Times a receipt can carry and `iso_time` can print: 1970-01-01 up to the end of year 9999 UTC. The
# bound also keeps a value far inside SQLite's signed 64-bit integers.
MIN_TIME_MS = 0
MAX_TIME_MS = 253_402_300_799_999
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_time_ms(text: str) -> int:
    """Unix milliseconds, or an ISO 8601 date / date-time (UTC when no offset is given), within
    [MIN_TIME_MS, MAX_TIME_MS]."""
    if re.fullmatch(r"-?[0-9]+", text):   # ASCII digits only: str.isdigit also takes '²', which int() refuses
        ms = int(text)
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise BillingError(f"{text!r} is neither unix milliseconds nor an ISO 8601 date or time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        # In integers: through float seconds, sub-millisecond digits of a far date round up a millisecond.
        ms = (moment - _EPOCH) // timedelta(milliseconds=1)
    if not MIN_TIME_MS <= ms <= MAX_TIME_MS:
        raise BillingError(f"{text!r} is out of range: times run from 1970-01-01 ({MIN_TIME_MS}) to "
                           f"9999-12-31 ({MAX_TIME_MS} unix ms)")
    return ms


def iso_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Period:
    """A billing period of a ledger: receipts issued in [since_ms, until_ms). Read lazily, one
    pass per use, so a period of 100k receipts never sits in memory; the ledger must stay open."""
    ledger: Ledger
    since_ms: int | None
    until_ms: int | None

    def receipts(self) -> Iterator[tuple[ReceiptRow, Receipt]]:
        """The period's receipts in sequence order, each re-verified (`verified_receipt`); BillingError
        names a bad one."""
        before: ReceiptRow | None = None
        for row in self.ledger.rows(self.since_ms, self.until_ms):
            yield row, verified_receipt(self.ledger, row, before)
            before = row


def verified_receipt(ledger: Ledger, row: ReceiptRow, before: ReceiptRow | None = None) -> Receipt:
    """The row's receipt, once it holds as `receipts verify` checks it; UnverifiedReceipt names what
    does not. Beside the signature, the columns a reader relies on: `issued_at_ms` picks the period,
    `digest` is the Merkle leaf, the acknowledgment makes `acknowledged`. An edited column would bill
    a receipt in another period, or root the period over bytes no client holds. And the chain back
    to the receipt before it (`before` when that is the one, else read from the ledger): a row
    deleted or moved would leave a client's receipt out of the root, or its leaves out of order."""
    try:
        previous = before.digest if before is not None and before.sequence == row.sequence - 1 \
            else ledger.envelope_digest(row.sequence - 1)
        if previous is None:
            raise RowProblem(f"receipt {row.sequence - 1} is missing (deleted?)")
        return check_row(row, row.sequence, previous, ledger.worker_public_key)
    except (DamagedRow, RowProblem) as exc:
        raise UnverifiedReceipt(f"sequence {row.sequence}: {exc}; run `receipts verify`") from None


def load_period(ledger: Ledger, since_ms: int | None, until_ms: int | None) -> Period:
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        # [since, until) would be empty: refused, so a swapped pair is not mistaken for "no receipts".
        raise BillingError(f"since ({iso_time(since_ms)}) must be before until ({iso_time(until_ms)})")
    return Period(ledger, since_ms, until_ms)


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


class _Summary:
    """Per-client totals, the period totals and the Merkle root, accumulated in one pass. Nothing per
    receipt is kept (the root is built as the leaves come), so memory grows with the clients only:
    20 MiB for 100k one-job clients."""

    def __init__(self, period: Period):
        self._period = period
        self._clients: dict[bytes, list[int]] = {}     # key -> receipts, output tokens, amount, acknowledged
        self._root = RootBuilder()
        self._first_sequence: int | None = None
        self._last_sequence: int | None = None
        self._amount = 0
        self._worker = ""

    def add(self, row: ReceiptRow, r: Receipt) -> None:
        t = self._clients.setdefault(r.client_public_key, [0, 0, 0, 0])
        t[0] += 1
        t[1] += r.output_tokens
        t[2] += r.amount_micros
        t[3] += row.ack_bytes is not None
        self._root.add(row.digest)
        if self._first_sequence is None:
            self._first_sequence = r.sequence
        self._last_sequence = r.sequence
        self._amount += r.amount_micros
        self._worker = r.worker_peer_id

    def client_totals(self) -> Iterator[dict[str, Any]]:
        """One 'client_total' record per client, by key (hex of equal-length keys sorts as the bytes)."""
        for client in sorted(self._clients):
            totals = dict(zip(_TOTAL_FIELDS[1:], self._clients[client]))
            yield {"record": "client_total", "client": client.hex(), **totals}

    def period_record(self) -> dict[str, Any]:
        return {
            "record": "period", "since_ms": self._period.since_ms, "until_ms": self._period.until_ms,
            "receipts": self._root.size, "amount_micros": self._amount, "first_sequence": self._first_sequence,
            "last_sequence": self._last_sequence, "worker_peer_id": self._worker, "merkle_rule": MERKLE_RULE,
            "merkle_root": self._root.root().hex()}


def write_export(period: Period, fmt: str, out: TextIO) -> dict[str, Any]:
    """Stream receipts, then per-client totals, then the period record; returns the period record."""
    if fmt == "jsonl":
        def write(record: dict[str, Any]) -> None:
            out.write(json.dumps(record, separators=(",", ":")) + "\n")
    elif fmt == "csv":
        # One table: a 'record' column says which fields of a row are filled.
        columns = ["record", *dict.fromkeys(_RECEIPT_FIELDS + _TOTAL_FIELDS + _PERIOD_FIELDS)]
        writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        write = writer.writerow
    else:
        raise BillingError(f"unknown export format {fmt!r} (jsonl or csv)")
    summary = _Summary(period)
    for row, r in period.receipts():
        write({"record": "receipt", **receipt_record(row, r)})
        summary.add(row, r)
    for record in summary.client_totals():
        write(record)
    period_record = summary.period_record()
    write(period_record)
    return period_record


def period_proof(period: Period, job_id: bytes, client_key: bytes | None) -> dict[str, Any]:
    """Inclusion proof of one job's receipt in the period's Merkle tree, as a JSON-able dict."""
    leaves: list[bytes] = []
    matches: list[tuple[int, ReceiptRow, Receipt]] = []
    for row, r in period.receipts():
        if r.job_id == job_id and (client_key is None or r.client_public_key == client_key):
            matches.append((len(leaves), row, r))
        leaves.append(row.digest)
    if not matches:
        raise BillingError(f"no receipt for job {job_id.hex()} in this period")
    if len(matches) > 1:
        raise BillingError(f"job id {job_id.hex()} was used by {len(matches)} clients; pass --client")
    index, row, receipt = matches[0]
    proof = inclusion_proof(leaves, index)
    return {"merkle_rule": MERKLE_RULE, "job_id": job_id.hex(), "client": receipt.client_public_key.hex(),
            "sequence": receipt.sequence, "since_ms": period.since_ms, "until_ms": period.until_ms,
            "receipt_digest": proof.leaf.hex(), "leaf_index": proof.leaf_index, "tree_size": proof.tree_size,
            "path": [p.hex() for p in proof.path], "merkle_root": proof.root.hex(),
            "envelope": base64.b64encode(row.envelope_bytes).decode()}


def check_proof(proof: dict[str, Any], expected_root: bytes, worker_peer_id: str | None = None) -> Receipt:
    """Raise BillingError unless `proof` (from `period_proof`) shows a genuine receipt under
    `expected_root`, and return that receipt. Genuine: the envelope is a dspark.v1.Receipt signed by
    the worker it names (by `worker_peer_id` when given), it bills by the rule, its digest is the
    proof's leaf, and the proof's job_id, client, sequence and period describe it.

    `expected_root` is required: it must come from outside the proof (the root published for the
    period). The root a proof carries is the prover's own claim; a forger computes one to match."""
    try:
        if proof["merkle_rule"] != MERKLE_RULE:
            raise BillingError(f"unknown Merkle rule {proof['merkle_rule']!r}")
        leaf = bytes.fromhex(proof["receipt_digest"])
        path = [bytes.fromhex(p) for p in proof["path"]]
        root = bytes.fromhex(proof["merkle_root"])
        index, size = _int(proof, "leaf_index"), _int(proof, "tree_size")
        envelope_bytes = base64.b64decode(proof["envelope"], validate=True)
        job_id, client = bytes.fromhex(proof["job_id"]), bytes.fromhex(proof["client"])
        sequence = _int(proof, "sequence")
        since_ms, until_ms = (_int(proof, k) if proof.get(k) is not None else None for k in ("since_ms", "until_ms"))
    except (KeyError, TypeError, ValueError) as exc:
        raise BillingError(f"malformed proof: {exc!r}") from None
    if hashlib.sha256(envelope_bytes).digest() != leaf:
        raise BillingError("receipt_digest is not the digest of the receipt envelope the proof carries")
    receipt = _signed_receipt(envelope_bytes, worker_peer_id)
    claims = {"job_id": (job_id, receipt.job_id), "client": (client, receipt.client_public_key),
              "sequence": (sequence, receipt.sequence)}
    for name, (claimed, signed) in claims.items():
        if claimed != signed:
            shown = (claimed.hex(), signed.hex()) if isinstance(signed, bytes) else (claimed, signed)
            raise BillingError(f"the proof's {name} {shown[0]} is not the signed receipt's {shown[1]}")
    if (since_ms is not None and receipt.issued_at_ms < since_ms) or \
            (until_ms is not None and receipt.issued_at_ms >= until_ms):
        raise BillingError(f"the receipt was issued at {iso_time(receipt.issued_at_ms)}, outside the proof's "
                           f"period [{since_ms}, {until_ms})")
    if expected_root != root:
        raise BillingError("the proof is for another root than the one expected")
    if not verify_inclusion(leaf, index, size, path, root):
        raise BillingError(f"the path does not lead from leaf {index} of {size} to the root")
    return receipt


def _int(proof: dict[str, Any], key: str) -> int:
    value = proof[key]
    if not isinstance(value, int) or isinstance(value, bool):   # int() would take "7", 7.9 and True
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _signed_receipt(envelope_bytes: bytes, worker_peer_id: str | None) -> Receipt:
    try:
        envelope = Envelope.FromString(envelope_bytes)
    except DecodeError:
        raise BillingError("the proof's envelope is not a dspark Envelope") from None
    try:
        # `is not None`: an empty --peer-id (an unset variable) is refused, not taken as none given.
        key = public_key_from_peer_id(worker_peer_id) if worker_peer_id is not None else bytes(envelope.public_key)
    except IdentityError as exc:
        raise BillingError(str(exc)) from None
    try:
        # Without an expected worker, the receipt must at least be signed by the worker it names.
        return check_receipt(envelope, key)
    except ReceiptError as exc:
        raise BillingError(f"the proof's receipt does not verify: {exc}") from None
