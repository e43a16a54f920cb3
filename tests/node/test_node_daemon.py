"""One real daemon process (tiny model, loopback gRPC) driven through the real client SDK."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import secrets
import sqlite3
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dspark.v1 import job_pb2, worker_pb2_grpc
from dspark.v1.envelope_pb2 import Envelope
from engine.api import GenerationRequest, GenerationResult, SamplingParams
from node.client import ClientError, JobRefused, WorkerClient
from node.envelope import seal
from node.identity import Identity
from node.ledger_schema import LEDGER_FILE
from node.receipts import billed_amount, check_acknowledgment, verify_receipt
from node_harness import node_toml, start_daemon

pytestmark = pytest.mark.slow

DENIED = Identity.from_seed(bytes(range(32)))
RATE = 6


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    extra = f"""
[admission]
mode = "denylist"
deny = ["{DENIED.peer_id}"]
rate_per_minute = {RATE}
max_concurrent_per_client = 2
clock_skew_s = 5
[pricing]
per_mtok_micros = 250000
per_gpu_second_micros = 1000
"""
    node = start_daemon(tmp_path_factory.mktemp("daemon"), node_toml(tiny_model, extra))
    yield node
    assert node.stop() == 0, node.stderr_text()[-3000:]


async def connect(daemon, identity: Identity | None = None) -> WorkerClient:
    return await WorkerClient.connect(daemon.grpc, identity or Identity.generate(), peer_id=daemon.peer_id)


async def refused(client: WorkerClient, job) -> JobRefused:
    with pytest.raises(JobRefused) as info:
        await client.run(job, timeout_s=60)
    return info.value


@pytest.mark.asyncio
async def test_streamed_text_equals_the_engine_in_process(daemon, tiny_model):
    from engine.async_engine import load_async_engine
    from engine.config import EngineConfig

    async with await connect(daemon) as client:
        chunks: list[str] = []
        job = client.sign_job(chat=[{"role": "user", "content": "Write a haiku about rivers."}], max_new_tokens=24)
        result = await client.run(job, on_text=chunks.append, timeout_s=60)
    engine = load_async_engine(EngineConfig(model=str(tiny_model), max_batch=2, max_context=2048, threads=1))
    await engine.start()
    try:
        prompt = engine.encode_chat([{"role": "user", "content": "Write a haiku about rivers."}])
        items = [item async for item in engine.generate(GenerationRequest(
            "ref", tuple(prompt), SamplingParams(max_new_tokens=24)))]
    finally:
        await engine.stop()
    expected = items[-1]
    assert isinstance(expected, GenerationResult)
    assert result.output_ids == expected.output_ids
    assert "".join(chunks) == result.text == expected.text
    assert result.accepted.prompt_tokens == len(prompt)
    assert result.receipt.output_tokens == len(expected.output_ids)
    assert result.receipt.worker_peer_id == daemon.peer_id
    assert result.receipt.amount_micros == billed_amount(len(expected.output_ids), 250_000,
                                                         result.receipt.gpu_seconds, 1000)


@pytest.mark.asyncio
async def test_receipt_can_be_fetched_and_acknowledged(daemon):
    async with await connect(daemon) as client:
        # The job's price caps default to the advertised prices, so a node that prices time admits it.
        job = client.sign_job(text="Once upon a time", max_new_tokens=5)
        result = await client.run(job, timeout_s=60)
        fetched = await client.get_receipt(job)
        assert fetched == result.receipt
        assert (result.receipt.price_per_mtok_micros, result.receipt.price_per_gpu_second_micros) == (250_000, 1000)
        assert await client.acknowledge(result.receipt_envelope) == result.receipt.sequence
        with pytest.raises(JobRefused) as info:
            await client.get_receipt(client.sign_job(text="never submitted", job_id=secrets.token_bytes(16)))
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        # Another client cannot acknowledge someone else's receipt.
        async with await connect(daemon) as other:
            with pytest.raises(JobRefused) as info:
                await other.acknowledge(result.receipt_envelope)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.asyncio
async def test_jobs_batched_together_split_the_gpu_seconds_they_bill(daemon):
    """Two clients' jobs decode in the same passes (max_batch 2): together they bill the device's time
    once. Billed at each job's wall time, as before, the pair billed those passes twice."""
    async with await connect(daemon) as first, await connect(daemon) as second:
        jobs = [(c, c.sign_job(text=f"Story number {i}:", max_new_tokens=160)) for i, c in enumerate((first, second))]
        started = time.monotonic()
        results = await asyncio.gather(*(c.run(job, timeout_s=60) for c, job in jobs))
        elapsed = time.monotonic() - started
    receipts = [r.receipt for r in results]
    assert all(r.output_tokens == 160 for r in receipts)
    assert sum(r.gpu_seconds for r in receipts) <= elapsed
    for r in receipts:
        assert 0 < r.gpu_seconds < r.prefill_seconds + r.decode_seconds
        assert r.amount_micros == billed_amount(r.output_tokens, 250_000, r.gpu_seconds, 1000)


def _job(client: WorkerClient, **fields) -> job_pb2.JobRequest:
    now = int(time.time() * 1000)
    request = job_pb2.JobRequest(job_id=secrets.token_bytes(16), worker_peer_id=client.peer_id,
                                 model=client.advert.models[0].id, text="Hello",
                                 sampling=job_pb2.SamplingParams(max_new_tokens=4),
                                 max_price_per_mtok_micros=client.advert.price_per_mtok_micros,
                                 issued_at_ms=now, expires_at_ms=now + 60_000)
    for name, value in fields.items():
        setattr(request, name, value)
    return request


@pytest.mark.asyncio
async def test_each_refusal_has_its_status_and_is_counted(daemon):
    identity = Identity.generate()
    async with await connect(daemon, identity) as client:
        tampered = client.sign_job(text="Hello", max_new_tokens=4)
        tampered.payload = tampered.payload[:-1] + bytes([tampered.payload[-1] ^ 1])
        now = int(time.time() * 1000)
        cases = {
            "bad_signature": (tampered, grpc.StatusCode.UNAUTHENTICATED),
            "wrong_worker": (seal(identity, _job(client, worker_peer_id=Identity.generate().peer_id)),
                             grpc.StatusCode.INVALID_ARGUMENT),
            "expired": (seal(identity, _job(client, issued_at_ms=now - 120_000, expires_at_ms=now - 60_000)),
                        grpc.StatusCode.FAILED_PRECONDITION),
            "not_yet_valid": (seal(identity, _job(client, issued_at_ms=now + 60_000, expires_at_ms=now + 120_000)),
                              grpc.StatusCode.FAILED_PRECONDITION),
            "unknown_model": (seal(identity, _job(client, model="gpt-17")), grpc.StatusCode.NOT_FOUND),
            "price_too_low": (client.sign_job(text="Hello", max_price_per_mtok_micros=249_999),
                              grpc.StatusCode.FAILED_PRECONDITION),
            "too_long": (client.sign_job(text="word " * 1500, max_new_tokens=1000), grpc.StatusCode.OUT_OF_RANGE),
            "malformed": (seal(identity, _job(client, job_id=b"short")), grpc.StatusCode.INVALID_ARGUMENT),
        }
        for reason, (job, code) in cases.items():
            error = await refused(client, job)
            assert (error.reason, error.code) == (reason, code), error
        error = await refused(client, client.sign_job(text="Hello", max_price_per_gpu_second_micros=999))
        assert error.reason == "price_too_low" and "GPU-second" in error.details, error
        # A job refused before it ran leaves its id unused; a job that ran consumes it for good.
        job = client.sign_job(text="Hello", max_new_tokens=2,
                              job_id=job_pb2.JobRequest.FromString(cases["too_long"][0].payload).job_id)
        await client.run(job, timeout_s=60)
        error = await refused(client, job)
        assert (error.reason, error.code) == ("replayed", grpc.StatusCode.ALREADY_EXISTS)
    async with await connect(daemon, DENIED) as denied:
        error = await refused(denied, denied.sign_job(text="Hello"))
        assert (error.reason, error.code) == ("not_allowed", grpc.StatusCode.PERMISSION_DENIED)
    metrics = httpx.get(daemon.ready["http"] + "/metrics", timeout=10).text
    for reason in (*cases, "replayed", "not_allowed"):
        match = re.search(rf'dspark_jobs_refused_total{{reason="{reason}"}} (\d+)', metrics)
        assert match and int(float(match.group(1))) >= 1, reason


@pytest.mark.asyncio
async def test_a_refusal_quotes_a_long_field_in_part_and_keeps_its_reason(daemon):
    """Quoted whole, a field of 20,000 characters passed gRPC's 16 KiB limit on the status message:
    the client got RESOURCE_EXHAUSTED ("metadata size exceeds hard limit"), not the refusal."""
    identity, long = Identity.generate(), "x" * 20_000
    async with await connect(daemon, identity) as client:
        role = _job(client, max_price_per_gpu_second_micros=client.advert.price_per_gpu_second_micros)
        role.chat.messages.add(role=long, content="hi")      # replaces the text prompt (a oneof)
        typed = seal(identity, _job(client))
        typed.payload_type = long
        cases = {"unknown_model": seal(identity, _job(client, model=long)), "malformed": typed,
                 "wrong_worker": seal(identity, _job(client, worker_peer_id=long))}
        for reason, job in {**cases, "malformed role": seal(identity, role)}.items():
            error = await refused(client, job)
            assert reason.startswith(error.reason) and "... (20000 characters)" in error.details, error
            assert len(error.details) < 300
    async with grpc.aio.insecure_channel(daemon.grpc) as channel:
        cancel = job_pb2.CancelJob(job_id=secrets.token_bytes(16), worker_peer_id=long,
                                   issued_at_ms=int(time.time() * 1000))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await worker_pb2_grpc.WorkerStub(channel).Cancel(seal(identity, cancel), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "... (20000 characters)" in info.value.details()


def test_submit_past_its_timeout_says_so(daemon, tmp_path, capsys):
    from node.cli import main

    code = main(["submit", "--node", daemon.grpc, "--raw", "--prompt", "Count:", "--max-new-tokens", "2000",
                 "--timeout", "0.5", "--key", str(tmp_path / "client.key")])
    err = capsys.readouterr().err
    assert code == 1 and "no result within --timeout 0.5 s; the worker stops the job" in err, err


def test_submit_command_sends_its_gpu_second_cap(daemon, tmp_path, capsys):
    from node.cli import main

    def submit(*flags: str) -> tuple[int, str]:
        code = main(["submit", "--node", daemon.grpc, "--prompt", "Hi", "--max-new-tokens", "2",
                     "--key", str(tmp_path / "client.key"), *flags])
        return code, capsys.readouterr().err

    code, err = submit("--max-price-gpu-second", "999")      # this node charges 1000 per GPU-second
    assert code == 1 and "GPU-second price cap 999 is below this node's price of 1000" in err, err
    code, err = submit("--max-price-gpu-second", "1000")
    assert code == 0 and "verified" in err, err


def test_submit_command_acknowledges_its_receipt_and_keeps_a_copy(daemon, tmp_path, capsys):
    """The node's ledger showed `ACK no` for every job sent with `submit`, which kept no receipt either."""
    from node.cli import main

    key, out = tmp_path / "client.key", tmp_path / "receipts" / "job.json"
    out.parent.mkdir()

    def submit(*flags: str) -> tuple[dict, str]:
        code = main(["submit", "--node", daemon.grpc, "--prompt", "Hi", "--max-new-tokens", "2", "--key", str(key),
                     "--receipt-out", str(out), *flags])
        err = capsys.readouterr().err
        assert code == 0, err
        assert [p.name for p in out.parent.iterdir()] == ["job.json"]     # no temporary file left beside it
        return json.loads(out.read_text()), err

    def acks_listed() -> list[str]:
        main(["receipts", "list", "--data-dir", str(daemon.data_dir), "--client", Identity.load(key).public_key.hex()])
        return [line.split()[-1] for line in capsys.readouterr().out.splitlines()[1:]]

    record, err = submit()
    envelope = Envelope.FromString(base64.b64decode(record["envelope"]))
    receipt = verify_receipt(envelope, daemon.peer_id)
    ack = Envelope.FromString(base64.b64decode(record["acknowledgment"]))
    check_acknowledgment(ack, envelope, receipt)
    assert ack.public_key == Identity.load(key).public_key and record["acknowledged"] is True
    assert (record["sequence"], record["job_id"]) == (receipt.sequence, receipt.job_id.hex())
    assert f"receipt #{receipt.sequence} acknowledged (countersigned with the client key {key})" in err
    assert f"receipt #{receipt.sequence} written to {out}" in err
    assert acks_listed() == ["yes"]

    record, err = submit("--no-acknowledge")        # the file is replaced, whole
    assert (record["acknowledgment"], record["acknowledged"]) == (None, False)
    assert record["sequence"] > receipt.sequence and "acknowledged (" not in err
    assert acks_listed() == ["no", "yes"]


@pytest.mark.asyncio
async def test_rate_limit_per_client(daemon):
    async with await connect(daemon) as client:
        for _ in range(RATE):
            await client.run(client.sign_job(text="Hi", max_new_tokens=1), timeout_s=60)
        error = await refused(client, client.sign_job(text="Hi", max_new_tokens=1))
        assert (error.reason, error.code) == ("rate_limited", grpc.StatusCode.RESOURCE_EXHAUSTED)
        async with await connect(daemon) as other:     # the quota is per client
            await other.run(other.sign_job(text="Hi", max_new_tokens=1), timeout_s=60)


@pytest.mark.asyncio
async def test_jobs_refused_once_tokenized_count_against_the_rate(daemon):
    """A prompt short enough in bytes to be tokenized and too long in tokens is refused after the
    node did that work: a client sending only those is rate-limited like any other."""
    async with await connect(daemon) as client:
        for _ in range(RATE):
            error = await refused(client, client.sign_job(text="hello " * 2100, max_new_tokens=1))
            assert error.reason == "too_long" and "exceeds the context" in str(error)
        error = await refused(client, client.sign_job(text="Hi", max_new_tokens=1))
        assert error.reason == "rate_limited"


async def _first_chunk(stream) -> None:
    async for event in stream:
        if event.WhichOneof("event") == "chunk":
            return


@pytest.mark.asyncio
async def test_concurrency_quota_and_cancel_frees_the_slot(daemon):
    async with await connect(daemon) as client:
        jobs = [client.sign_job(text="Count:", max_new_tokens=2000) for _ in range(2)]
        streams = [client.stream(job, timeout_s=120) for job in jobs]
        await asyncio.wait_for(asyncio.gather(*(_first_chunk(s) for s in streams)), 60)
        assert (await client.capacity()).free_slots == 0
        error = await refused(client, client.sign_job(text="Hi", max_new_tokens=1))
        assert (error.reason, error.code) == ("too_many_concurrent", grpc.StatusCode.RESOURCE_EXHAUSTED)
        # A signed Cancel by the owner ends the first job; the stream still delivers a receipt.
        job_id = job_pb2.JobRequest.FromString(jobs[0].payload).job_id
        assert await client.cancel(job_id) is True
        events = [event async for event in streams[0]]
        result = events[-1].result
        assert result.finish_reason == "cancelled"
        receipt = verify_receipt(result.receipt, daemon.peer_id, result.output_token_ids)
        assert receipt.outcome == "cancelled" and receipt.output_tokens < 2000
        # A client going away (closing its stream) cancels the second one.
        await streams[1].aclose()
        deadline = time.monotonic() + 30
        while (await client.capacity()).free_slots < 2:
            assert time.monotonic() < deadline, "the slot was not freed"
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert (await client.get_receipt(jobs[1])).outcome == "cancelled"
                break
            except JobRefused:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        # Only the owner can cancel; a finished job is no longer cancellable.
        async with await connect(daemon) as stranger:
            with pytest.raises(JobRefused) as info:
                await stranger.cancel(job_id)
            assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert await client.cancel(job_id) is False
        await client.run(client.sign_job(text="Hi", max_new_tokens=1), timeout_s=60)


@pytest.mark.asyncio
async def test_deadline_cancels_the_job(daemon):
    async with await connect(daemon) as client:
        job = client.sign_job(text="Count:", max_new_tokens=2000)
        with pytest.raises(JobRefused) as info:
            await client.run(job, timeout_s=0.5)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 30
        while True:
            try:
                receipt = await client.get_receipt(job)
                break
            except JobRefused:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        assert receipt.outcome == "cancelled" and receipt.output_tokens < 2000


@pytest.mark.asyncio
async def test_a_job_whose_client_leaves_while_it_is_registered_leaves_its_id_unused(daemon):
    # Another process holds the ledger's write lock (a backup, an operator's sqlite3 shell), so the
    # job's registration waits on it; the client's deadline passes meanwhile.
    async with await connect(daemon) as client:
        job = client.sign_job(text="Hi", max_new_tokens=1)
        job_id = job_pb2.JobRequest.FromString(job.payload).job_id
        holder = sqlite3.connect(daemon.data_dir / LEDGER_FILE, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(JobRefused) as info:
                await client.run(job, timeout_s=1.0)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        # Registered once the lock is gone, then forgotten: no 'running' row for the next start to
        # give a 'failed' receipt.
        deadline = time.monotonic() + 30
        while f"job {job_id.hex()}: the client left while it was registered" not in daemon.stderr_text():
            assert time.monotonic() < deadline, daemon.stderr_text()[-3000:]
            await asyncio.sleep(0.1)
        with contextlib.closing(sqlite3.connect(daemon.data_dir / LEDGER_FILE)) as ledger:
            assert ledger.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchall() == []
        result = await client.run(job, timeout_s=60)     # the same signed job, not a replay
        assert result.receipt.outcome == "completed"


@pytest.mark.asyncio
async def test_health_serving_and_reflection_lists_the_service(daemon):
    async with grpc.aio.insecure_channel(daemon.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "dspark.v1.Worker"):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = [r async for r in stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)]
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"dspark.v1.Worker", "grpc.health.v1.Health"} <= names


@pytest.mark.asyncio
async def test_client_refuses_a_worker_with_another_peer_id(daemon):
    with pytest.raises(ClientError, match="not the expected"):
        await WorkerClient.connect(daemon.grpc, Identity.generate(), peer_id=Identity.generate().peer_id)
