"""Throughput receipts: build and sign them (worker), verify and countersign them (client).

Billing rule (docs/receipts.md): the client pays for the tokens the target accepted and emitted
(`output_tokens`), never for draft tokens, plus optionally for device time:

    amount = ceil(output_tokens * price_per_mtok_micros / 10^6)
           + ceil(gpu_us * price_per_gpu_second_micros / 10^6)
    gpu_us = round_half_even(gpu_seconds * 10^6)

`gpu_seconds` is the job's share of the device's time: each batched pass's wall time split among the
requests in it by the tokens each put in it (engine/api.py share_pass_time), so it is at most the job's
own prefill + decode wall time, and equal to it when the job ran alone.

Both terms are exact integer arithmetic once `gpu_us` is taken from the receipt's double, so any
language (or a settlement contract fed `gpu_us`) recomputes the same amount.
"""

from __future__ import annotations

import functools
import hashlib
import math
import struct
import time
from dataclasses import dataclass
from typing import Sequence

from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.receipt_pb2 import Acknowledgment, Receipt
from engine.api import RequestStats
from node.envelope import EnvelopeError, digest, open_envelope, seal
from node.identity import Identity, IdentityError, peer_id_from_public_key, public_key_from_peer_id

OUTCOMES = ("completed", "cancelled", "failed")
_GPU_TIME_ROUNDING_S = 1e-6
GENESIS_DIGEST = bytes(32)     # previous_receipt_digest of the first receipt in a ledger
_U32 = 2**32
_MAX_AMOUNT = 2**63     # SQLite integers are signed 64-bit
_MAX_JOB_ID_BYTES = 64


class ReceiptError(ValueError):
    """A receipt (or acknowledgment) that must not be trusted; `reason` is a short tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class JobOutcome:
    """What the service knows when a job ends; the ledger turns it into a signed receipt."""
    job_id: bytes
    client_key: bytes
    job_digest: bytes
    model: str
    model_digest: bytes
    drafter: str
    drafter_digest: bytes
    outcome: str                      # "completed" | "cancelled" | "failed"
    stats: RequestStats
    output_ids: tuple[int, ...]       # the token ids the client received; billed and digested
    device: str
    price_per_mtok_micros: int
    price_per_gpu_second_micros: int

    def __post_init__(self) -> None:
        # Raised at construction, before any ledger write, so a bad outcome never half-writes.
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        if not 1 <= len(self.job_id) <= _MAX_JOB_ID_BYTES:
            raise ValueError(f"job_id must be 1..{_MAX_JOB_ID_BYTES} bytes, got {len(self.job_id)}")
        if len(self.client_key) != 32:
            raise ValueError(f"client_key must be a 32-byte Ed25519 key, got {len(self.client_key)} bytes")
        if len(self.job_digest) != 32:
            raise ValueError(f"job_digest must be a sha256 (32 bytes), got {len(self.job_digest)}")
        for name in ("price_per_mtok_micros", "price_per_gpu_second_micros"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 2**63:
                raise ValueError(f"{name} must be an integer in [0, 2^63), got {value!r}")
        if any(not 0 <= t < _U32 for t in self.output_ids):
            raise ValueError("output token ids must fit in u32")


def output_digest(output_ids: Sequence[int]) -> bytes:
    """sha256 of the output token ids, each as u32 little-endian."""
    return hashlib.sha256(struct.pack(f"<{len(output_ids)}I", *output_ids)).digest()


def gpu_microseconds(gpu_seconds: float) -> int:
    # The product, not only the seconds: above ~1.8e302 s it is infinite and round() would raise
    # OverflowError, which callers (catching ValueError) would let through as a traceback.
    micros = gpu_seconds * 1_000_000
    if not math.isfinite(micros) or gpu_seconds < 0:
        raise ValueError(f"gpu_seconds must be a finite non-negative number of microseconds, got {gpu_seconds}")
    return round(micros)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def billed_amount(output_tokens: int, price_per_mtok_micros: int, gpu_seconds: float,
                  price_per_gpu_second_micros: int) -> int:
    """The billing rule of the module docstring, in micro-units."""
    return (_ceil_div(output_tokens * price_per_mtok_micros, 1_000_000)
            + _ceil_div(gpu_microseconds(gpu_seconds) * price_per_gpu_second_micros, 1_000_000))


def build_receipt(outcome: JobOutcome, worker_peer_id: str, sequence: int,
                  previous_receipt_digest: bytes, issued_at_ms: int) -> Receipt:
    stats = outcome.stats
    output_tokens = len(outcome.output_ids)  # what the client got; stats may count differently
    gpu_seconds = max(0.0, stats.device_seconds)
    amount = billed_amount(output_tokens, outcome.price_per_mtok_micros, gpu_seconds,
                           outcome.price_per_gpu_second_micros)
    if amount >= _MAX_AMOUNT:
        raise ValueError(f"amount {amount} exceeds the largest the ledger stores (2^63 - 1)")
    return Receipt(
        job_digest=outcome.job_digest, job_id=outcome.job_id, client_public_key=outcome.client_key,
        worker_peer_id=worker_peer_id, model=outcome.model, model_digest=outcome.model_digest,
        drafter=outcome.drafter, drafter_digest=outcome.drafter_digest,
        prompt_tokens=_u32(stats.prompt_tokens), output_tokens=output_tokens, rounds=_u32(stats.rounds),
        drafted_tokens=_u32(stats.drafted_tokens), verified_tokens=_u32(stats.verified_tokens),
        accepted_tokens=_u32(stats.accepted_tokens), tau=stats.tau,
        queue_seconds=stats.queue_seconds, prefill_seconds=stats.prefill_seconds,
        decode_seconds=stats.decode_seconds, tokens_per_second=stats.tokens_per_second,
        device=outcome.device, price_per_mtok_micros=outcome.price_per_mtok_micros,
        price_per_gpu_second_micros=outcome.price_per_gpu_second_micros, gpu_seconds=gpu_seconds,
        amount_micros=amount, output_digest=output_digest(outcome.output_ids), sequence=sequence,
        previous_receipt_digest=previous_receipt_digest, outcome=outcome.outcome,
        issued_at_ms=issued_at_ms)


def _u32(value: int) -> int:
    return min(max(int(value), 0), _U32 - 1)


@functools.lru_cache(maxsize=64)
def _peer_id(public_key: bytes) -> str:
    """Cached: an audit checks the same worker's peer ID on every one of its receipts."""
    return peer_id_from_public_key(public_key)


def sign_receipt(identity: Identity, receipt: Receipt) -> Envelope:
    return seal(identity, receipt)


def check_receipt(envelope: Envelope, worker_public_key: bytes) -> Receipt:
    """Signature by `worker_public_key`, peer ID and billing arithmetic; returns the receipt."""
    if envelope.public_key != worker_public_key:
        raise ReceiptError("wrong_signer", "receipt is not signed by the worker's key")
    try:
        receipt = open_envelope(envelope, Receipt)
    except EnvelopeError as exc:
        raise ReceiptError(exc.reason, f"receipt envelope refused: {exc}") from None
    if receipt.worker_peer_id != _peer_id(worker_public_key):
        raise ReceiptError("wrong_worker", f"receipt names worker {receipt.worker_peer_id!r}, not its signer")
    if receipt.outcome not in OUTCOMES:
        raise ReceiptError("bad_outcome", f"receipt outcome {receipt.outcome!r} is not one of {OUTCOMES}")
    try:
        expected = billed_amount(receipt.output_tokens, receipt.price_per_mtok_micros,
                                 receipt.gpu_seconds, receipt.price_per_gpu_second_micros)
    except ValueError as exc:
        raise ReceiptError("bad_amount", f"receipt amount cannot be recomputed: {exc}") from None
    if receipt.amount_micros != expected:
        raise ReceiptError("bad_amount", f"receipt bills {receipt.amount_micros} micros, the billing "
                                         f"rule gives {expected}")
    # A job's share of its passes cannot exceed the passes' time (the shares are sums of fractions of
    # them; the allowance is float rounding only).
    passes = receipt.prefill_seconds + receipt.decode_seconds
    if not receipt.gpu_seconds <= passes * (1 + 1e-9) + _GPU_TIME_ROUNDING_S:
        raise ReceiptError("bad_gpu_time", f"receipt bills {receipt.gpu_seconds:g} GPU-seconds, more than the "
                                           f"{passes:g} s of prefill and decode it reports")
    return receipt


def verify_receipt(envelope: Envelope, worker_peer_id: str,
                   output_ids: Sequence[int] | None = None) -> Receipt:
    """Client side: the receipt is signed by `worker_peer_id`'s key, bills by the rule, and (when
    `output_ids` is given) covers exactly the tokens the client received."""
    try:
        worker_key = public_key_from_peer_id(worker_peer_id)
    except IdentityError as exc:
        raise ReceiptError("bad_peer_id", str(exc)) from None
    receipt = check_receipt(envelope, worker_key)
    if output_ids is not None:
        if receipt.output_tokens != len(output_ids):
            raise ReceiptError("output_mismatch", f"receipt bills {receipt.output_tokens} output tokens, "
                                                  f"{len(output_ids)} were received")
        if receipt.output_digest != output_digest(output_ids):
            raise ReceiptError("output_mismatch", "receipt output digest does not match the tokens received")
    return receipt


def check_price_caps(receipt: Receipt, max_price_per_mtok_micros: int, max_price_per_gpu_second_micros: int) -> None:
    """Client side: the receipt charges no unit price above the caps the client signed in its job.
    The amount check cannot catch this alone: an overpriced receipt's arithmetic is still right."""
    if receipt.price_per_mtok_micros > max_price_per_mtok_micros:
        raise ReceiptError("over_price_cap", f"receipt charges {receipt.price_per_mtok_micros} micros per million "
                                             f"tokens, above the job's cap of {max_price_per_mtok_micros}")
    if receipt.price_per_gpu_second_micros > max_price_per_gpu_second_micros:
        raise ReceiptError("over_price_cap", f"receipt charges {receipt.price_per_gpu_second_micros} micros per "
                                             f"GPU-second, above the job's cap of {max_price_per_gpu_second_micros}")


def acknowledgment(identity: Identity, receipt_envelope: Envelope,
                   acknowledged_at_ms: int | None = None) -> Envelope:
    """The client's countersignature over a receipt it accepted (send it with `Acknowledge`)."""
    if acknowledged_at_ms is None:
        acknowledged_at_ms = int(time.time() * 1000)
    receipt = Receipt()
    receipt.ParseFromString(receipt_envelope.payload)
    ack = Acknowledgment(receipt_digest=digest(receipt_envelope), worker_peer_id=receipt.worker_peer_id,
                         sequence=receipt.sequence, acknowledged_at_ms=acknowledged_at_ms)
    return seal(identity, ack)


def check_acknowledgment(ack_envelope: Envelope, receipt_envelope: Envelope, receipt: Receipt) -> Acknowledgment:
    """The ack is signed by the receipt's client and names this exact receipt."""
    if ack_envelope.public_key != receipt.client_public_key:
        raise ReceiptError("wrong_signer", "acknowledgment is not signed by the receipt's client")
    try:
        ack = open_envelope(ack_envelope, Acknowledgment)
    except EnvelopeError as exc:
        raise ReceiptError(exc.reason, f"acknowledgment envelope refused: {exc}") from None
    if ack.receipt_digest != digest(receipt_envelope):
        raise ReceiptError("wrong_receipt", "acknowledgment is over a different receipt digest")
    if ack.worker_peer_id != receipt.worker_peer_id or ack.sequence != receipt.sequence:
        raise ReceiptError("wrong_receipt", "acknowledgment names another worker or sequence")
    return ack
