"""Receipts: the billing rule, the output digest, client-side verification and acknowledgments."""

from __future__ import annotations

import hashlib
import math
import struct
from fractions import Fraction

import grpc
import pytest
from hypothesis import given, strategies as st
from receipts_helpers import CLIENT, OTHER_CLIENT, WORKER, bill, outcome, worker_answer

from dspark.v1 import job_pb2, worker_pb2_grpc
from dspark.v1.advert_pb2 import CapacityAdvert
from dspark.v1.receipt_pb2 import Receipt
from node.client import ClientError, WorkerClient
from node.envelope import seal
from node.receipts import (ReceiptError, acknowledgment, billed_amount, check_acknowledgment,
                           output_digest, verify_receipt)


@given(tokens=st.integers(0, 2**32 - 1), price=st.integers(0, 2**40), seconds=st.floats(0, 1e6),
       gpu_price=st.integers(0, 2**40))
def test_billing_rule_rounds_each_term_up_to_a_whole_micro(tokens, price, seconds, gpu_price):
    token_part = Fraction(tokens * price, 10**6)
    gpu_part = Fraction(round(seconds * 1e6) * gpu_price, 10**6)
    amount = billed_amount(tokens, price, seconds, gpu_price)
    assert token_part + gpu_part <= amount < token_part + gpu_part + 2
    assert billed_amount(tokens, price, 0.0, gpu_price) == math.ceil(token_part)


def test_draft_tokens_are_reported_but_never_billed(ledger):
    few = Receipt.FromString(bill(ledger, 1, drafted=0, accepted=0).payload)
    many = Receipt.FromString(bill(ledger, 2, drafted=500, accepted=400).payload)
    assert (few.drafted_tokens, many.drafted_tokens) == (0, 500)
    assert many.accepted_tokens == 400
    assert few.amount_micros == many.amount_micros == math.ceil(3 * 250_000 / 10**6)


def test_receipt_carries_both_measures_for_token_and_time_pricing(ledger):
    receipt = Receipt.FromString(bill(ledger, 1, output_ids=tuple(range(1000)), price_mtok=1_500_000,
                                      price_gpu_s=2_000_000, prefill=0.25, decode=1.5).payload)
    assert receipt.output_tokens == 1000
    assert receipt.gpu_seconds == pytest.approx(1.75)
    assert receipt.amount_micros == 1000 * 1_500_000 // 10**6 + 175 * 2_000_000 // 100
    assert receipt.tau == pytest.approx((5 + 2) / 2)
    # Batched, the job had a share of those passes: the time charge is that share, the wall times stay.
    shared = Receipt.FromString(bill(ledger, 2, price_gpu_s=2_000_000, prefill=0.25, decode=1.5,
                                     device_seconds=0.5).payload)
    assert (shared.gpu_seconds, shared.prefill_seconds, shared.decode_seconds) == (0.5, 0.25, 1.5)
    assert shared.amount_micros == 1 + 1_000_000


def test_output_digest_is_sha256_of_u32_little_endian_ids():
    ids = [0, 1, 49151, 2**32 - 1]
    assert output_digest(ids) == hashlib.sha256(b"".join(struct.pack("<I", i) for i in ids)).digest()
    assert output_digest([1, 2]) != output_digest([2, 1])


def test_client_verifies_the_receipt_it_received(ledger):
    envelope = bill(ledger, 1, output_ids=(5, 6, 7))
    receipt = verify_receipt(envelope, WORKER.peer_id, [5, 6, 7])
    assert (receipt.sequence, receipt.client_public_key) == (1, CLIENT.public_key)


@pytest.mark.parametrize("problem", ["other_worker", "other_tokens", "fewer_tokens", "edited_payload",
                                     "inflated_amount_resigned_by_other"])
def test_client_refuses_a_receipt_that_does_not_hold(ledger, problem):
    envelope = bill(ledger, 1, output_ids=(5, 6, 7))
    worker, ids = WORKER.peer_id, [5, 6, 7]
    if problem == "other_worker":
        worker = OTHER_CLIENT.peer_id
    elif problem == "other_tokens":
        ids = [5, 6, 8]
    elif problem == "fewer_tokens":
        ids = [5, 6]
    elif problem == "edited_payload":
        receipt = Receipt.FromString(envelope.payload)
        receipt.amount_micros += 1
        envelope.payload = receipt.SerializeToString(deterministic=True)
    else:
        receipt = Receipt.FromString(envelope.payload)
        receipt.amount_micros *= 10
        envelope = seal(OTHER_CLIENT, receipt)
    with pytest.raises(ReceiptError):
        verify_receipt(envelope, worker, ids)


def test_a_receipt_billing_more_gpu_time_than_its_own_passes_is_refused():
    """A job's GPU-seconds are its share of the passes it was in, so never more than their wall time;
    a receipt claiming more is refused even though its amount follows the rule."""
    receipt = Receipt(worker_peer_id=WORKER.peer_id, outcome="completed", output_tokens=4, prefill_seconds=0.25,
                      decode_seconds=0.75, price_per_gpu_second_micros=1000, gpu_seconds=1.5)
    receipt.amount_micros = billed_amount(4, 0, 1.5, 1000)
    with pytest.raises(ReceiptError, match="bills 1.5 GPU-seconds, more than the 1 s of prefill and decode") as info:
        verify_receipt(seal(WORKER, receipt), WORKER.peer_id)
    assert info.value.reason == "bad_gpu_time"
    receipt.gpu_seconds = 1.0
    receipt.amount_micros = billed_amount(4, 0, 1.0, 1000)
    assert verify_receipt(seal(WORKER, receipt), WORKER.peer_id).gpu_seconds == 1.0


def test_a_worker_cannot_sign_a_receipt_that_breaks_the_billing_rule():
    receipt = Receipt(worker_peer_id=WORKER.peer_id, outcome="completed")
    receipt.output_tokens, receipt.price_per_mtok_micros, receipt.amount_micros = 10, 10**6, 11
    with pytest.raises(ReceiptError, match="billing rule gives 10"):
        verify_receipt(seal(WORKER, receipt), WORKER.peer_id)


@pytest.mark.parametrize("seconds", [1e303, 1.7e308])
def test_gpu_seconds_whose_microseconds_overflow_are_refused_as_a_bad_amount(seconds):
    # Finite seconds, but seconds * 10^6 is infinite: round() raised OverflowError, which the client
    # and `receipts verify-proof` did not catch (a traceback for a worker's hostile receipt).
    receipt = Receipt(worker_peer_id=WORKER.peer_id, outcome="completed", prefill_seconds=seconds,
                      gpu_seconds=seconds, price_per_gpu_second_micros=1)
    with pytest.raises(ReceiptError, match="cannot be recomputed") as info:
        verify_receipt(seal(WORKER, receipt), WORKER.peer_id)
    assert info.value.reason == "bad_amount"


def test_acknowledgment_binds_the_client_to_that_receipt(ledger):
    first, second = bill(ledger, 1), bill(ledger, 2)
    receipt = Receipt.FromString(first.payload)
    ack = acknowledgment(CLIENT, first)
    assert check_acknowledgment(ack, first, receipt).sequence == 1
    with pytest.raises(ReceiptError, match="client"):
        check_acknowledgment(acknowledgment(OTHER_CLIENT, first), first, receipt)
    with pytest.raises(ReceiptError, match="different receipt"):
        check_acknowledgment(acknowledgment(CLIENT, second), first, receipt)


@pytest.mark.parametrize("field,value", [("outcome", "done"), ("job_id", b""), ("client_key", b"x" * 31),
                                         ("price_per_mtok_micros", -1), ("output_ids", (2**32,))])
def test_job_outcome_refuses_bad_values_before_anything_is_written(field, value):
    kwargs = outcome(1).__dict__ | {field: value}
    with pytest.raises(ValueError, match=field.split("_")[0]):
        type(outcome(1))(**kwargs)


@pytest.mark.asyncio
@pytest.mark.parametrize("price_mtok,price_gpu_s,refused", [
    (100_000, 0, None),                       # what the worker advertised: accepted
    (100_001, 0, "per million tokens"),       # above the token price cap
    (100_000, 1, "per GPU-second"),           # a time charge the client never agreed to (cap 0)
])
async def test_client_refuses_a_receipt_above_the_jobs_price_caps(price_mtok, price_gpu_s, refused):
    advert = CapacityAdvert(peer_id=WORKER.peer_id, price_per_mtok_micros=100_000)
    advert.models.add(id="m")
    async with WorkerClient(grpc.aio.insecure_channel("127.0.0.1:1"), CLIENT, advert) as client:
        job = client.sign_job(text="hi", max_new_tokens=4)
        result = worker_answer(job, price_mtok, price_gpu_s)
        if refused is None:
            verified = client._verify(job, job_pb2.JobAccepted(), result, [1, 2, 3, 4], None, 6.0)
            assert verified.receipt.price_per_mtok_micros == 100_000
        else:
            with pytest.raises(ClientError) as info:
                client._verify(job, job_pb2.JobAccepted(), result, [1, 2, 3, 4], None, 6.0)
            assert refused in str(info.value) and "above the job's cap" in str(info.value)


@pytest.mark.asyncio
async def test_a_gpu_second_cap_the_client_signed_covers_the_workers_time_price():
    advert = CapacityAdvert(peer_id=WORKER.peer_id, price_per_mtok_micros=100_000, price_per_gpu_second_micros=500)
    advert.models.add(id="m")
    async with WorkerClient(grpc.aio.insecure_channel("127.0.0.1:1"), CLIENT, advert) as client:
        job = client.sign_job(text="hi", max_new_tokens=4)     # caps default to the advertised prices
        assert job_pb2.JobRequest.FromString(job.payload).max_price_per_gpu_second_micros == 500
        verified = client._verify(job, job_pb2.JobAccepted(), worker_answer(job, 100_000, 500), [1, 2, 3, 4],
                                  None, 6.0)
        assert verified.receipt.amount_micros == billed_amount(4, 100_000, 5.0, 500)
        with pytest.raises(ClientError, match="per GPU-second"):
            client._verify(job, job_pb2.JobAccepted(), worker_answer(job, 100_000, 501), [1, 2, 3, 4], None, 6.0)


class _ReceiptServer(worker_pb2_grpc.WorkerServicer):
    """A worker over a real socket that answers GetReceipt with whatever receipt it is given: the
    client must judge it against the job it signed, not take the worker's word for it."""

    def __init__(self) -> None:
        self.receipt = job_pb2.JobResult().receipt

    async def GetReceipt(self, request, context):
        return self.receipt


def _fetched(job, **changes) -> Receipt:
    """The receipt `worker_answer` would stream for `job` at the advertised prices, with `changes`
    applied and re-signed by WORKER (the amount kept by the rule)."""
    receipt = Receipt.FromString(worker_answer(job, 100_000, 0).receipt.payload)
    for name, value in changes.items():
        setattr(receipt, name, value)
    receipt.amount_micros = billed_amount(receipt.output_tokens, receipt.price_per_mtok_micros,
                                          receipt.gpu_seconds, receipt.price_per_gpu_second_micros)
    return receipt


@pytest.mark.asyncio
async def test_a_fetched_receipt_is_held_to_the_job_its_client_and_the_price_caps():
    worker = _ReceiptServer()
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    advert = CapacityAdvert(peer_id=WORKER.peer_id, price_per_mtok_micros=100_000)
    advert.models.add(id="m")
    try:
        async with WorkerClient(grpc.aio.insecure_channel(f"127.0.0.1:{port}"), CLIENT, advert) as client:
            job, other_job = client.sign_job(text="hi", max_new_tokens=4), client.sign_job(text="hi", max_new_tokens=4)
            cases = [
                (_fetched(job), None),
                (_fetched(other_job), "the receipt is for another job"),
                (_fetched(job, job_id=b"another-job-id"), "the receipt is for another job"),
                (_fetched(job, client_public_key=OTHER_CLIENT.public_key), "the receipt is for another client"),
                (_fetched(job, price_per_mtok_micros=100_001), "per million tokens, above the job's cap"),
                (_fetched(job, price_per_gpu_second_micros=1), "per GPU-second, above the job's cap of 0"),
            ]
            for receipt, refused in cases:
                worker.receipt = seal(WORKER, receipt)
                if refused is None:
                    assert await client.get_receipt(job) == receipt
                else:
                    with pytest.raises(ClientError, match=refused):
                        await client.get_receipt(job)
            worker.receipt = seal(OTHER_CLIENT, _fetched(job))
            with pytest.raises(ClientError, match="receipt does not verify"):
                await client.get_receipt(job)
    finally:
        await server.stop(None)
