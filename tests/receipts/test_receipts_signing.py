"""Receipts: the billing rule, the output digest, client-side verification and acknowledgments."""

from __future__ import annotations

import hashlib
import math
import struct
from fractions import Fraction

import pytest
from hypothesis import given, strategies as st
from receipts_helpers import CLIENT, OTHER_CLIENT, WORKER, bill, outcome

from dspark.v1.receipt_pb2 import Receipt
from node.envelope import seal
from node.receipts import (ReceiptError, acknowledgment, billed_amount, check_acknowledgment, output_digest,
                           verify_receipt)


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


def test_a_worker_cannot_sign_a_receipt_that_breaks_the_billing_rule():
    receipt = Receipt(worker_peer_id=WORKER.peer_id, outcome="completed")
    receipt.output_tokens, receipt.price_per_mtok_micros, receipt.amount_micros = 10, 10**6, 11
    with pytest.raises(ReceiptError, match="billing rule gives 10"):
        verify_receipt(seal(WORKER, receipt), WORKER.peer_id)


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
