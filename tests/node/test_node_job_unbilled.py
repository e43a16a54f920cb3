"""A job whose receipt the ledger cannot write still ends: for the dashboard, the metrics and its client."""

from __future__ import annotations

import asyncio

import pytest

from dspark.v1 import job_pb2
from engine.api import EngineInfo, GenerationResult, RequestStats, TokenChunk
from node.activity import Activity
from node.admission import generation_request, open_job
from node.envelope import seal
from node.events import EventBus, JobFinished
from node.identity import Identity
from node.jobs import JobTable
from node.ledger import Ledger

INFO = EngineInfo(model_id="m", model_digest=b"", method="ar", drafter_id="", drafter_digest=b"", device="cpu",
                  dtype="float32", max_context=100, max_batch=2, block_size=0)


class OneTokenEngine:
    async def generate(self, request):
        yield TokenChunk(request.request_id, (7,), "x")
        yield GenerationResult(request.request_id, (7,), "x", "length",
                               RequestStats(prompt_tokens=1, output_tokens=1))


@pytest.mark.asyncio
async def test_a_job_the_ledger_could_not_bill_leaves_the_dashboards_active_jobs(tmp_path):
    worker, client = Identity.generate(), Identity.generate()
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", worker)
    events = EventBus()
    activity = Activity(events)
    finished: list[JobFinished] = []
    events.subscribe(lambda e: finished.append(e) if isinstance(e, JobFinished) else None)
    jobs = JobTable(OneTokenEngine(), ledger, events, INFO, price_per_mtok_micros=0, price_per_gpu_second_micros=0)
    # Never registered in the ledger: finish_job refuses it, as it would a write on a full disk.
    job = open_job(seal(client, job_pb2.JobRequest(
        job_id=b"j" * 16, worker_peer_id=worker.peer_id, model="m", text="hi", issued_at_ms=1, expires_at_ms=2,
        sampling=job_pb2.SamplingParams(max_new_tokens=1))))
    jobs.reserve(job)
    running = jobs.start(job, generation_request(job, (1,), "n"))
    await asyncio.wait_for(running.runner, 10)
    events_sent = [running.stream.get_nowait() for _ in range(running.stream.qsize())]
    assert events_sent[-1].result.finish_reason == "error" and not events_sent[-1].result.HasField("receipt")
    assert activity.jobs()["active"] == []
    assert activity.jobs()["counts"]["failed"] == 1
    assert [(e.outcome, e.receipt_sequence, e.amount_micros) for e in finished] == [("failed", 0, 0)]
    ledger.close()
