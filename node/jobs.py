"""The node's running jobs: per-client quotas, one runner task per job, receipts, and the drain.

A job runs in its own task, apart from the RPC that submitted it: if the client goes away or its
deadline passes, the RPC only asks the engine to cancel, and the runner still collects the engine's
final result and writes the receipt (billed for what was streamed), which GetReceipt then serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dspark.v1 import job_pb2
from dspark.v1.receipt_pb2 import Receipt
from engine.api import EngineFailed, EngineInfo, GenerationRequest, GenerationResult, RequestStats, TokenChunk
from node.admission import Load, SignedJob
from node.events import EventBus, JobAdmitted, JobFinished, JobProgress, NodeDraining
from node.ledger import Ledger
from node.rate_window import RecentCounts
from node.receipts import JobOutcome

if TYPE_CHECKING:     # engine.async_engine imports torch; the node loads it once, in the daemon
    from engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

_OUTCOMES = {"stop": "completed", "length": "completed", "cancelled": "cancelled", "error": "failed"}


@dataclass
class RunningJob:
    job: SignedJob
    request: GenerationRequest
    # SubmitEvents for the RPC to stream: chunks as committed, then exactly one result.
    stream: asyncio.Queue[job_pb2.SubmitEvent] = field(default_factory=asyncio.Queue)
    runner: asyncio.Task[None] | None = None
    output: list[int] = field(default_factory=list)     # token ids streamed so far
    # A cancel can come before the runner has handed the request to the engine (the engine knows
    # nothing of it then): the runner reads this first and ends the job without running it.
    cancel_requested: bool = False
    in_engine: bool = False
    first_token_at: float | None = None     # monotonic
    _held: job_pb2.SubmitEvent | None = None

    async def next_event(self) -> job_pb2.SubmitEvent:
        """The next event to send. Chunks already waiting are merged into one message: no token
        is delayed, but a lagging client or a busy loop costs fewer gRPC writes."""
        event, self._held = self._held or await self.stream.get(), None
        if event.HasField("chunk"):
            while not self.stream.empty():
                following = self.stream.get_nowait()
                if not following.HasField("chunk"):
                    self._held = following
                    break
                event.chunk.token_ids.extend(following.chunk.token_ids)
                event.chunk.text += following.chunk.text
        return event


class JobTable:
    def __init__(self, engine: AsyncEngine, ledger: Ledger, events: EventBus, info: EngineInfo,
                 price_per_mtok_micros: int, price_per_gpu_second_micros: int,
                 clock: Callable[[], float] = time.monotonic):
        self._engine = engine
        self._ledger = ledger
        self._events = events
        self._info = info
        self._price = price_per_mtok_micros
        self._price_gpu_s = price_per_gpu_second_micros
        self._jobs: dict[tuple[bytes, bytes], RunningJob] = {}
        # Jobs admitted and not yet started (tokenizing, registering) -> whether a Cancel came for them.
        self._preparing: dict[tuple[bytes, bytes], bool] = {}
        self._clock = clock
        self._active: dict[bytes, int] = defaultdict(int)
        self._held: dict[str, int] = defaultdict(int)     # jobs reserved and not yet released, per source network
        self._admitted = RecentCounts()     # admissions per client key
        self._arrived = RecentCounts()      # Submit calls past the address limit, per source network
        self.draining = False

    # --- quotas -------------------------------------------------------------------------------

    def load(self, client: bytes) -> Load:
        return Load(client_active=self._active.get(client, 0),
                    client_recent=self._admitted.count(client, self._clock()),
                    queue_depth=self.waiting_for_slot, draining=self.draining)

    @property
    def waiting_for_slot(self) -> int:
        """Jobs this node holds beyond the engine's slots. Counted from the reservations, not the
        engine's queue: a job admitted a moment ago may still be tokenizing or registering, and
        admission counting only what the engine has would let a burst past the engine's own limit
        (which then fails each job it refuses, after it was accepted). A job writing its receipt
        still counts for those milliseconds, which errs on the side of refusing."""
        return max(0, sum(self._active.values()) - self._info.max_batch)

    def reserve(self, job: SignedJob) -> None:
        """Count a job against its client's and its address's quotas as soon as it passes admission,
        before any await, so concurrent submissions cannot all slip under the limits."""
        self._active[job.client_key] += 1
        self._held[job.source] += 1
        self._admitted.add(job.client_key, self._clock())

    def held(self, source: str) -> int:
        """Jobs from this source network being prepared, waiting or running."""
        return self._held.get(source, 0)

    def arrivals(self, source: str) -> int:
        """Submit calls from this source network (node/admission.py source_network) let past its
        limit in the last minute."""
        return self._arrived.count(source, self._clock())

    def arrive(self, source: str) -> None:
        """Count a Submit call from `source`, before its signature is checked: keys are free, and
        this is the limit a client cannot sidestep by signing each job with a new one."""
        self._arrived.add(source, self._clock())

    def release(self, job: SignedJob) -> None:
        """The job ended, or was refused after admission. Its admission still counts against the
        client's rate either way: a job refused once its prompt was tokenized (too long for the context,
        a replayed id) cost the node that work, and a client sending only such jobs had no rate to
        spend and no limit on how much of it the node did."""
        for counts, key in ((self._active, job.client_key), (self._held, job.source)):
            counts[key] -= 1
            if counts[key] <= 0:
                del counts[key]

    # --- running --------------------------------------------------------------------------------

    def preparing(self, job: SignedJob) -> None:
        """The job passed admission and is being tokenized and registered (after `reserve`): a Cancel
        for it must be kept until it starts, or the client is told there is no such job while it
        goes on to run and be billed."""
        self._preparing[(job.client_key, job.request.job_id)] = False

    def withdraw(self, job: SignedJob) -> None:
        """The prepared job was refused (or its client left) before it started."""
        self._preparing.pop((job.client_key, job.request.job_id), None)
        self.release(job)

    def cancel_preparing(self, client: bytes, job_id: bytes) -> bool:
        key = (client, job_id)
        if key not in self._preparing:
            return False
        self._preparing[key] = True
        return True

    def find(self, client: bytes, job_id: bytes) -> RunningJob | None:
        return self._jobs.get((client, job_id))

    def start(self, job: SignedJob, request: GenerationRequest) -> RunningJob:
        key = (job.client_key, job.request.job_id)
        running = RunningJob(job, request, cancel_requested=self._preparing.pop(key, False))
        self._jobs[key] = running
        self._events.publish(JobAdmitted(job_id=job.request.job_id.hex(), client=job.client_key.hex(),
                                         prompt_tokens=len(request.prompt_ids),
                                         max_new_tokens=request.sampling.max_new_tokens))
        running.runner = asyncio.create_task(self._run(running), name=f"job-{job.request.job_id.hex()}")
        return running

    def cancel(self, running: RunningJob) -> bool:
        """True when the job had not finished: the engine had it, or the runner has yet to hand it over."""
        running.cancel_requested = True
        return self._engine.cancel(running.request.request_id) or not running.in_engine

    def progress(self, running: RunningJob) -> job_pb2.SubmitEvent:
        """The heartbeat of a job with nothing else to send, with its place in the engine's line for
        a slot (which is not the order of admission: slots go to the address holding the fewest)."""
        position = self._engine.queue_position(running.request.request_id) if running.in_engine \
            else self.place_in_line()
        return job_pb2.SubmitEvent(progress=job_pb2.JobProgress(queue_position=position,
                                                                output_tokens=len(running.output)))

    def place_in_line(self) -> int:
        """Where a job not handed to the engine yet stands, as progress events count: 0 when a slot
        is free for it, else behind every job waiting (the engine's fair line may put it earlier)."""
        return 0 if self._engine.free_slots else self._engine.queue_depth + 1

    def progress_before_start(self) -> job_pb2.SubmitEvent:
        """The heartbeat of a job still being prepared (its prompt waiting for a tokenizer thread). It
        holds no slot yet; its place is counted as `waiting_for_slot` counts, from the reservations
        (its own among them), and is at least 1."""
        return job_pb2.SubmitEvent(progress=job_pb2.JobProgress(queue_position=max(1, self.waiting_for_slot)))

    async def _run(self, running: RunningJob) -> None:
        job = running.job
        admitted_at = time.monotonic()
        result: GenerationResult | None = None
        try:
            if running.cancel_requested:      # before the engine had it: the job ends with nothing run
                result = GenerationResult(running.request.request_id, (), "", "cancelled",
                                          RequestStats(prompt_tokens=len(running.request.prompt_ids)))
            else:
                result = await self._generate(running, admitted_at)
        except EngineFailed as exc:     # the engine logged its cause, with the traceback if it has one
            log.error("job %s: %s", job.request.job_id.hex(), exc)
        except Exception:
            log.exception("job %s failed in the engine", job.request.job_id.hex())
        try:
            await self._finish(running, result, tuple(running.output),
                               None if running.first_token_at is None else running.first_token_at - admitted_at)
        finally:
            del self._jobs[(job.client_key, job.request.job_id)]
            self.release(job)

    async def _generate(self, running: RunningJob, admitted_at: float) -> GenerationResult | None:
        """Run the job on the engine, its chunks to the RPC's stream (and `running.output`) as they come; the
        engine's result. Nothing awaits between `_run` reading `cancel_requested` and the request
        entering the engine's inbox (generate's first step), so a cancel finds one or the other."""
        job, result = running.job, None
        running.in_engine = True
        generation = self._engine.generate(running.request)
        try:
            async for item in generation:
                if isinstance(item, TokenChunk):
                    first = running.first_token_at is None
                    if first:
                        running.first_token_at = time.monotonic()
                    running.output.extend(item.token_ids)
                    running.stream.put_nowait(job_pb2.SubmitEvent(
                        chunk=job_pb2.TokenChunk(token_ids=item.token_ids, text=item.text)))
                    self._events.publish(JobProgress(job_id=job.request.job_id.hex(), output_tokens=len(running.output),
                                                     elapsed_seconds=time.monotonic() - admitted_at,
                                                     first_token=first))
                else:
                    result = item
        finally:
            await generation.aclose()
        return result

    async def _finish(self, running: RunningJob, result: GenerationResult | None, streamed: tuple[int, ...],
                      ttft: float | None) -> None:
        job = running.job
        if result is None:   # the engine raised: bill nothing beyond what was streamed
            result = GenerationResult(running.request.request_id, streamed, "", "error",
                                      RequestStats(prompt_tokens=len(running.request.prompt_ids),
                                                   output_tokens=len(streamed)))
        outcome = JobOutcome(
            job_id=job.request.job_id, client_key=job.client_key, job_digest=job.digest,
            model=self._info.model_id, model_digest=self._info.model_digest, drafter=self._info.drafter_id,
            drafter_digest=self._info.drafter_digest, outcome=_OUTCOMES[result.finish_reason],
            stats=result.stats, output_ids=tuple(result.output_ids), device=self._info.device,
            price_per_mtok_micros=self._price, price_per_gpu_second_micros=self._price_gpu_s)
        event = job_pb2.JobResult(finish_reason=result.finish_reason, text=result.text,
                                  output_token_ids=result.output_ids)
        # Without a receipt the job still ended (the dashboard and metrics must not count it running
        # for ever): as 'failed', which is what the next start's Ledger.recover bills its row as.
        billed, amount, sequence = "failed", 0, 0
        try:
            # Shielded: a drain that cancels this task must not lose the receipt mid-write.
            envelope = await asyncio.shield(asyncio.to_thread(self._ledger.finish_job, outcome))
        except Exception:
            log.exception("job %s: the ledger could not write its receipt", job.request.job_id.hex())
            event.finish_reason = "error"
        else:
            event.receipt.CopyFrom(envelope)
            receipt = Receipt.FromString(envelope.payload)
            billed, amount, sequence = outcome.outcome, receipt.amount_micros, receipt.sequence
        self._events.publish(JobFinished(
            job_id=job.request.job_id.hex(), client=job.client_key.hex(), outcome=billed, stats=result.stats,
            amount_micros=amount, receipt_sequence=sequence, time_to_first_token=ttft))
        running.stream.put_nowait(job_pb2.SubmitEvent(result=event))

    async def drain(self, grace_s: float, cancel_wait_s: float = 10.0) -> int:
        """Stop admitting, let running jobs finish within `grace_s`, cancel the rest (they still
        get receipts). Returns how many had to be cancelled."""
        self.draining = True
        self._events.publish(NodeDraining(grace_seconds=grace_s))
        runners = [r.runner for r in self._jobs.values() if r.runner]
        if runners:
            await asyncio.wait(runners, timeout=grace_s)
        leftover = list(self._jobs.values())
        for running in leftover:
            self.cancel(running)
        pending = [r.runner for r in leftover if r.runner]
        if pending:
            await asyncio.wait(pending, timeout=cancel_wait_s)
        return len(leftover)
