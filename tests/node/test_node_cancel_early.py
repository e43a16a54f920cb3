"""A Cancel that comes before the engine has the job: while the job is tokenized and registered, or
between its start and the runner handing it to the engine. Either way the job ends cancelled, with
no token run and a receipt billing nothing, and the client hears that it was cancelled (before, the
first got NOT_FOUND and the second `cancelled: false`, and the job ran to the end and was billed)."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from dspark.v1 import job_pb2
from dspark.v1.receipt_pb2 import Receipt
from engine.async_engine import load_async_engine
from engine.config import EngineConfig
from node.admission import generation_request, open_job
from node.envelope import seal
from node.events import EventBus
from node.identity import Identity
from node.jobs import JobTable
from node.ledger import Ledger

WORKER, CLIENT = Identity.generate(), Identity.generate()


@pytest_asyncio.fixture
async def table(tiny_model, tmp_path):
    engine = load_async_engine(EngineConfig(model=str(tiny_model), max_batch=2, max_context=256, threads=1))
    await engine.start()
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", WORKER)
    yield JobTable(engine, ledger, EventBus(), engine.info, price_per_mtok_micros=1_000_000,
                   price_per_gpu_second_micros=1_000_000)
    await engine.stop()
    ledger.close()


def signed_job(table: JobTable, n: int):
    job = open_job(seal(CLIENT, job_pb2.JobRequest(
        job_id=bytes([n]) * 16, worker_peer_id=WORKER.peer_id, model="m", text="hi", issued_at_ms=1,
        expires_at_ms=2, sampling=job_pb2.SamplingParams(max_new_tokens=64))))
    assert table._ledger.register_job(job.client_key, job.request.job_id, job.digest, 2)
    return job


async def ended(running) -> list[job_pb2.SubmitEvent]:
    await asyncio.wait_for(running.runner, 30)
    return [running.stream.get_nowait() for _ in range(running.stream.qsize())]


def assert_cancelled_unrun(events: list[job_pb2.SubmitEvent]) -> None:
    assert [e.WhichOneof("event") for e in events] == ["result"]
    result = events[0].result
    receipt = Receipt.FromString(result.receipt.payload)
    assert (result.finish_reason, tuple(result.output_token_ids)) == ("cancelled", ())
    billed = (receipt.outcome, receipt.output_tokens, receipt.gpu_seconds, receipt.amount_micros)
    assert billed == ("cancelled", 0, 0, 0)


@pytest.mark.asyncio
async def test_a_job_cancelled_while_it_is_prepared_starts_cancelled(table):
    job = signed_job(table, 1)
    assert not table.cancel_preparing(job.client_key, job.request.job_id)    # not admitted yet
    table.reserve(job)
    table.preparing(job)
    assert table.cancel_preparing(job.client_key, job.request.job_id)
    assert not table.cancel_preparing(WORKER.public_key, job.request.job_id)   # only its own client's
    running = table.start(job, generation_request(job, (1, 2, 3), "a"))
    assert_cancelled_unrun(await ended(running))
    assert table.load(job.client_key).client_active == 0


@pytest.mark.asyncio
async def test_a_job_cancelled_before_its_runner_ran_is_not_run(table):
    job = signed_job(table, 2)
    table.reserve(job)
    table.preparing(job)
    running = table.start(job, generation_request(job, (1, 2, 3), "b"))
    assert table.cancel(running)       # the runner task has not run yet: the engine has never seen it
    assert_cancelled_unrun(await ended(running))


@pytest.mark.asyncio
async def test_a_withdrawn_job_forgets_its_cancel_and_a_running_one_still_cancels(table):
    job = signed_job(table, 3)
    table.reserve(job)
    table.preparing(job)
    table.withdraw(job)        # refused after admission (too long, replayed) or its client left
    assert not table.cancel_preparing(job.client_key, job.request.job_id)
    assert table.load(job.client_key).client_active == 0
    other = signed_job(table, 4)
    table.reserve(other)
    table.preparing(other)
    running = table.start(other, generation_request(other, (1, 2, 3), "c"))
    while not running.output:        # running in the engine now
        await asyncio.sleep(0.01)
    assert table.cancel(running)
    events = await ended(running)
    result = events[-1].result
    assert result.finish_reason == "cancelled" and 0 < len(result.output_token_ids) < 64
