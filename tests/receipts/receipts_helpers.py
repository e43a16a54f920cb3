"""Helpers for the receipts / ledger tests (and the crash-test child): fixed identities, outcomes,
a worker's signed answer to a job."""

from __future__ import annotations

import hashlib

from dspark.v1 import job_pb2
from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.receipt_pb2 import Receipt
from engine.api import RequestStats
from node.envelope import digest, seal
from node.identity import Identity
from node.ledger import Ledger
from node.receipts import GENESIS_DIGEST, JobOutcome, billed_amount, output_digest

WORKER = Identity.from_seed(hashlib.sha256(b"test worker").digest())
CLIENT = Identity.from_seed(hashlib.sha256(b"test client").digest())
OTHER_CLIENT = Identity.from_seed(hashlib.sha256(b"other client").digest())


def job_id(n: int) -> bytes:
    return n.to_bytes(16, "big")


def job_digest(client: Identity, n: int) -> bytes:
    return hashlib.sha256(client.public_key + job_id(n)).digest()


def outcome(n: int, client: Identity = CLIENT, output_ids: tuple[int, ...] = (11, 12, 13), outcome: str = "completed",
            price_mtok: int = 250_000, price_gpu_s: int = 0, prefill: float = 0.05, decode: float = 0.2,
            drafted: int = 8, accepted: int = 5, device_seconds: float | None = None) -> JobOutcome:
    """`device_seconds`: the job's share of the device (default: all of its passes, as when it ran alone)."""
    stats = RequestStats(prompt_tokens=7, output_tokens=len(output_ids), rounds=2, drafted_tokens=drafted,
                         verified_tokens=drafted, accepted_tokens=accepted, queue_seconds=0.01,
                         prefill_seconds=prefill, decode_seconds=decode,
                         device_seconds=prefill + decode if device_seconds is None else device_seconds)
    return JobOutcome(job_id=job_id(n), client_key=client.public_key, job_digest=job_digest(client, n),
                      model="smollm2-135m-instruct", model_digest=hashlib.sha256(b"weights").digest(),
                      drafter="ngram", drafter_digest=b"", outcome=outcome, stats=stats, output_ids=output_ids,
                      device="cpu", price_per_mtok_micros=price_mtok, price_per_gpu_second_micros=price_gpu_s)


def bill(ledger: Ledger, n: int, client: Identity = CLIENT, **kwargs):
    """Register and finish job n, as the gRPC service does; returns the receipt envelope."""
    ledger.register_job(client.public_key, job_id(n), job_digest(client, n), expires_at_ms=0)
    return ledger.finish_job(outcome(n, client, **kwargs))


def worker_answer(job: Envelope, price_mtok: int, price_gpu_s: int, gpu_seconds: float = 5.0) -> job_pb2.JobResult:
    """A JobResult for CLIENT's `job` whose receipt, signed by WORKER, bills four tokens and `gpu_seconds`
    by the rule at the given prices: what a worker charging those prices sends."""
    ids = [1, 2, 3, 4]
    receipt = Receipt(job_digest=digest(job), job_id=job_pb2.JobRequest.FromString(job.payload).job_id,
                      client_public_key=CLIENT.public_key, worker_peer_id=WORKER.peer_id, output_tokens=len(ids),
                      output_digest=output_digest(ids), price_per_mtok_micros=price_mtok,
                      price_per_gpu_second_micros=price_gpu_s, gpu_seconds=gpu_seconds, decode_seconds=gpu_seconds,
                      outcome="completed", sequence=1,
                      previous_receipt_digest=GENESIS_DIGEST)
    receipt.amount_micros = billed_amount(len(ids), price_mtok, gpu_seconds, price_gpu_s)
    return job_pb2.JobResult(output_token_ids=ids, receipt=seal(WORKER, receipt), finish_reason="length")
