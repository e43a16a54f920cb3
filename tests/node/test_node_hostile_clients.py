"""What a client can make a real daemon do with jobs it is allowed to send: the node's answers stay
consistent with themselves, and nothing the client does ends up as a traceback in the node's log."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import sqlite3
import string
import time
from pathlib import Path

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from transformers import AutoTokenizer

from dspark.v1 import job_pb2
from dspark.v1.envelope_pb2 import Envelope
from node.client import JobRefused, WorkerClient
from node.envelope import pae
from node.identity import Identity
from node.ledger_schema import LEDGER_FILE
from node.receipts import acknowledgment
from node.service import longest_token_bytes
from node_harness import CONTEXT, node_toml, start_daemon

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    # One job at a time per client: this module's clients run theirs one after another.
    node = start_daemon(tmp_path_factory.mktemp("hostile"),
                        node_toml(tiny_model, "[admission]\nmax_concurrent_per_client = 1\n"))
    yield node
    assert node.stop() == 0, node.stderr_text()[-3000:]


async def connect(daemon, identity: Identity | None = None) -> WorkerClient:
    return await WorkerClient.connect(daemon.grpc, identity or Identity.generate(), peer_id=daemon.peer_id)


def padding(size: int) -> bytes:
    """A field no schema of ours numbers (15, length-delimited): protobuf keeps it as an unknown field."""
    length = bytes([size & 0x7F | 0x80, size >> 7 & 0x7F | 0x80, size >> 14])   # a varint, for size < 2**21
    return bytes([15 << 3 | 2]) + length + b"J" * size


@pytest.mark.asyncio
async def test_a_stop_string_longer_than_the_output_so_far_is_never_streamed(daemon):
    """The engine holds back the last len(stop) - 1 characters while a stop string may still complete.
    Cut as text[:len(text) - hold], a text shorter than that counted from its end: with stop ':::::'
    after 'Count:' the client was streamed '::', then got the result '' (the stop string began there)."""
    async with await connect(daemon) as client:
        plain = await client.run(client.sign_job(text="Count:", max_new_tokens=48), timeout_s=60)
        stop = plain.text[:24]
        assert len(stop) == 24, plain.text
        streamed: list[str] = []
        result = await client.run(client.sign_job(text="Count:", max_new_tokens=48, stop=[stop]),
                                  on_text=streamed.append, timeout_s=60)
    assert result.finish_reason == "stop"
    assert "".join(streamed) == result.text == plain.text[:plain.text.find(stop)]


@pytest.mark.asyncio
async def test_an_acknowledgment_padded_with_unknown_fields_does_not_fill_the_ledger(daemon):
    """An acknowledgment is the one thing a client sends that the ledger keeps, for ever. Stored as
    sent, each of a client's receipts took up to 2 MiB of its padding (measured: 1.9 MB a row, where
    an acknowledgment is ~200 bytes), for the price of a one-token job."""
    identity = Identity.generate()
    async with await connect(daemon, identity) as client:
        result = await client.run(client.sign_job(text="Hi", max_new_tokens=1), timeout_s=60)
        honest = acknowledgment(identity, result.receipt_envelope)
        payload = honest.payload + padding(500_000)       # signed: only its size can be refused
        padded = Envelope(payload_type=honest.payload_type, payload=payload, public_key=identity.public_key,
                          signature=identity.sign(pae(honest.payload_type, payload)))
        with pytest.raises(JobRefused) as info:
            await client.acknowledge(result.receipt_envelope, ack=padded)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds" in info.value.details
        # Padding outside the signed payload is not the client's acknowledgment: it is not kept.
        async with grpc.aio.insecure_channel(daemon.grpc) as channel:
            answer = await channel.unary_unary("/dspark.v1.Worker/Acknowledge")(
                honest.SerializeToString() + padding(500_000), timeout=30)
        assert answer       # the sequence, as an AcknowledgeResponse
    with contextlib.closing(sqlite3.connect(daemon.data_dir / LEDGER_FILE)) as ledger:
        stored = ledger.execute("SELECT envelope FROM acknowledgments WHERE sequence = ?",
                                (result.receipt.sequence,)).fetchone()[0]
    assert stored == honest.SerializeToString(deterministic=True)


@pytest.mark.asyncio
@pytest.mark.parametrize("timeout_s", [float("inf"), float("nan"), 1e10])
async def test_a_deadline_grpc_cannot_hold_is_the_callers_error_not_a_refusal(daemon, timeout_s):
    """grpc's deadline overflows past some 7e9 s: the call failed at once with DEADLINE_EXCEEDED, as a
    JobRefused that reads as the worker's answer (a caller fails over to the next worker in vain)."""
    async with await connect(daemon) as client:
        job = client.sign_job(text="Hi", max_new_tokens=1)
        with pytest.raises(ValueError, match="timeout_s must be at most 86400"):
            await client.run(job, timeout_s=timeout_s)
        with pytest.raises(ValueError, match="timeout_s must be at most 86400"):
            await client.capacity(timeout_s=timeout_s)
        assert (await client.run(job, timeout_s=60)).finished     # never sent: its id is unused



IDENTITY_POINT = bytes([1]) + bytes(31)
ORDER_8_POINT = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")


def forged(public_key: bytes, client: WorkerClient) -> Envelope:
    """A job "signed" by a small-order key without any private key: R the identity point, S = 0. It
    verifies for a job whose hash is 0 modulo the key's order: every one for the identity, one in 8
    for a point of order 8 (its job id is ground until it does)."""
    signature = bytes([1]) + bytes(63)
    while True:
        now = int(time.time() * 1000)
        request = job_pb2.JobRequest(
            job_id=secrets.token_bytes(16), worker_peer_id=client.peer_id, model=client.advert.models[0].id,
            text="Hi", sampling=job_pb2.SamplingParams(max_new_tokens=1),
            max_price_per_mtok_micros=client.advert.price_per_mtok_micros, issued_at_ms=now, expires_at_ms=now + 60_000)
        envelope = Envelope(payload_type="dspark.v1.JobRequest", payload=request.SerializeToString(),
                            public_key=public_key, signature=signature)
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, pae(envelope.payload_type,
                                                                                 envelope.payload))
        except InvalidSignature:
            continue
        return envelope


@pytest.mark.asyncio
@pytest.mark.parametrize("public_key", [IDENTITY_POINT, ORDER_8_POINT])
async def test_a_key_anyone_can_sign_for_is_refused(daemon, public_key):
    """Ed25519 keys of small order verify signatures no one made. The node ran such jobs and billed
    a client key with no owner: its jobs and acknowledgments prove nothing in a billing dispute."""
    async with await connect(daemon) as client:
        with pytest.raises(JobRefused) as info:
            async for _ in client.stream(forged(public_key, client), timeout_s=60):
                pass
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "bad_signature")



def slowest_prompt(model: Path) -> str:
    """Random ASCII as long as admission lets through untokenized (0.4 s to tokenize on a 2-core box):
    the most tokens per byte, so the longest tokenization (runs of one character or words are faster)."""
    size = CONTEXT * longest_token_bytes(AutoTokenizer.from_pretrained(model))
    rng = random.Random(0)
    return "".join(rng.choice(string.ascii_lowercase + string.digits + " ,.;") for _ in range(size))


@pytest.mark.asyncio
async def test_a_job_its_client_left_counts_against_its_quota_until_its_prompt_is_tokenized(daemon, tiny_model):
    """Tokenizing runs in a thread, which goes on when the client leaves. The job's quota was freed at
    once: a client leaving each job after 100 ms had as many prompts tokenizing as the pool has
    threads (min(32, CPUs + 4)), past its limit of concurrent jobs."""
    identity = Identity.generate()
    async with await connect(daemon, identity) as client:
        with pytest.raises(JobRefused) as info:
            await client.run(client.sign_job(text=slowest_prompt(tiny_model), max_new_tokens=1), timeout_s=0.1)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(JobRefused) as info:
            await client.run(client.sign_job(text="Hi", max_new_tokens=1), timeout_s=60)
        assert info.value.reason == "too_many_concurrent", info.value
        deadline = time.monotonic() + 60
        while True:     # admitted once the first prompt is tokenized (and refused as too long)
            try:
                assert (await client.run(client.sign_job(text="Hi", max_new_tokens=1), timeout_s=60)).finished
                break
            except JobRefused as error:
                assert error.reason == "too_many_concurrent" and time.monotonic() < deadline, error
                await asyncio.sleep(0.2)


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["chat", "text"])
async def test_a_prompt_no_tokenization_could_fit_is_refused_before_it_is_tokenized(daemon, tiny_model, kind):
    """A 1 MiB chat of 120k empty messages took 3.4 s of chat template, holding the GIL (four at once
    made another client's 600-token job 5x slower), and 1 MiB of text 1 s. Refused at admission now:
    its refusal counts no tokens. One byte less than this text is tokenized (the test above)."""
    async with await connect(daemon) as client:
        job = (client.sign_job(chat=[{"role": "user", "content": ""}] * 120_000, max_new_tokens=1) if kind == "chat"
               else client.sign_job(text=slowest_prompt(tiny_model) + "x", max_new_tokens=1))
        with pytest.raises(JobRefused) as info:
            await client.run(job, timeout_s=60)
    assert info.value.reason == "too_long", info.value
    expected = ("120000 chat messages, at least one token each" if kind == "chat"
                else f"{CONTEXT * longest_token_bytes(AutoTokenizer.from_pretrained(tiny_model)) + 1} bytes are more")
    assert expected in str(info.value), info.value
