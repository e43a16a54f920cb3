"""The Worker gRPC servicer: decode, check (node/admission.py), call the engine, encode.

Every refusal ends the RPC with the status of `STATUS[reason]`, a message that says what was wrong,
and the reason tag in the trailing metadata (`dspark-refusal`) for programs; each is published as
a JobRefused event, which is how refusals are counted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc

from dspark.v1 import job_pb2, worker_pb2, worker_pb2_grpc
from dspark.v1.advert_pb2 import CapacityAdvert
from dspark.v1.envelope_pb2 import Envelope
from engine.api import GenerationRequest, RequestRejected
from node import admission
from node.admission import REFUSAL_KEY, Policy, Reason, Refusal, SignedJob
from node.config import NodeConfig, client_key_bytes
from node.envelope import EnvelopeError, open_envelope, quoted, seal
from node.events import EventBus, JobRefused
from node.identity import Identity
from node.jobs import JobTable
from node.ledger import LedgerError
from node.smallest_first import SmallestFirst

log = logging.getLogger(__name__)

STATUS = {
    Reason.BAD_SIGNATURE: grpc.StatusCode.UNAUTHENTICATED,
    Reason.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.BAD_SAMPLING: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.WRONG_WORKER: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.EXPIRED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.NOT_YET_VALID: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.PRICE_TOO_LOW: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.REPLAYED: grpc.StatusCode.ALREADY_EXISTS,
    Reason.NOT_ALLOWED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.TOO_MANY_CONCURRENT: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.UNKNOWN_MODEL: grpc.StatusCode.NOT_FOUND,
    Reason.TOO_LONG: grpc.StatusCode.OUT_OF_RANGE,
    Reason.SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
}
_CHAT_ROLES = ("system", "user", "assistant")
# Threads that tokenize prompts: a quarter of the cores, at least one. A tokenizer takes the CPU the
# engine thread needs; in asyncio's shared pool (5+ threads) four clients sending the largest prompts
# admission lets through had four tokenizing at once, and a running 600-token job took 9-10 s
# instead of 1.3 s on a node given one core; 4.6 s with one such thread (the rest is that core's
# share). Ledger writes no longer wait behind them in that pool either.
TOKENIZE_THREADS = max(1, (os.cpu_count() or 1) // 4)
# They run 10 nice levels below the node (its engine thread): the tokenizer releases the GIL, so on
# a core both want the kernel decides, and at weight 110 against 1024 a flood of prompts to tokenize
# takes a tenth of the core from running jobs instead of half. A new job waits longer for its prompt
# while the core is busy (the largest prompt admission lets through, 0.4 s alone, up to ten times
# that); a GPU host has cores to spare for both.
TOKENIZE_NICE = 10
# A call from an address past its limit is answered this late. Refused at once, a flooding client
# only sent faster: four clients on one address sent 690 refused 1 MiB jobs a second, and receiving
# them took the core a running job needed (docs/benchmarks.md, the prompt flood). A client that
# waits for its answers now sends one call a second per stream. Held calls are capped, so that one
# opening many streams at once costs the node no more than that many idle tasks (the job itself is
# not kept); past the cap the refusal is immediate.
TARPIT_S = 1.0
MAX_TARPITTED = 256


def build_policy(config: NodeConfig, peer_id: str, engine) -> Policy:
    info = engine.info
    return Policy(
        worker_peer_id=peer_id, model_id=info.model_id, max_context=info.max_context,
        max_new_tokens_limit=info.max_context - 1,     # the prompt takes at least one token
        price_per_mtok_micros=config.pricing.price_for(info.model_id), mode=config.admission.mode,
        allow=frozenset(map(client_key_bytes, config.admission.allow)),
        deny=frozenset(map(client_key_bytes, config.admission.deny)),
        rate_per_minute=config.admission.rate_per_minute,
        max_concurrent_per_client=config.admission.max_concurrent_per_client,
        max_queue=config.admission.max_queue, clock_skew_ms=int(config.admission.clock_skew_s * 1000),
        price_per_gpu_second_micros=config.pricing.per_gpu_second_micros,
        address_rate_per_minute=config.admission.address_rate_per_minute,
        max_concurrent_per_address=config.admission.max_concurrent_per_address,
        longest_token_bytes=longest_token_bytes(engine.tokenizer))


def longest_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes of text one token stands for, at most: its vocabulary's longest token
    string. Byte-level BPE writes a byte as one character of one or two bytes, SentencePiece a space as
    '▁' (three), so the strings only overstate (SmolLM2: 162, for a run of 81 spaces). A normalizer
    that shrinks text (NFKC's ligatures) could make it understate; none of the chat models here has
    one."""
    return max(len(token.encode()) for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
               if token)


def tokenizer_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="tokenize",
                                                 initializer=_lower_thread_priority)


def _lower_thread_priority() -> None:
    """Linux schedules threads as tasks, each with its own nice value; elsewhere this is a no-op."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + TOKENIZE_NICE))
    except (AttributeError, OSError):
        log.debug("cannot lower the tokenizer threads' priority on this platform")


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, identity: Identity, policy: Policy, engine, ledger, events: EventBus, jobs: JobTable,
                 capacity: Callable[[], CapacityAdvert], heartbeat_s: float):
        self._identity = identity
        self._policy = policy
        self._engine = engine
        self._ledger = ledger
        self._events = events
        self._jobs = jobs
        self._capacity = capacity
        self._heartbeat_s = heartbeat_s
        self._tokenizing = tokenizer_pool()
        self._tokenize_order = SmallestFirst(TOKENIZE_THREADS)
        self._tarpitted = 0

    def close(self) -> None:
        """After the server stopped: no call is left to wait for a tokenization."""
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    async def _refuse(self, context: grpc.aio.ServicerContext, refusal: Refusal, client: bytes = b"") -> NoReturn:
        self._events.publish(JobRefused(reason=refusal.reason.value, message=refusal.message, client=client.hex()))
        await context.abort(STATUS[refusal.reason], refusal.message,
                            trailing_metadata=((REFUSAL_KEY, refusal.reason.value),))

    async def Submit(self, request: Envelope, context: grpc.aio.ServicerContext) -> AsyncIterator[job_pb2.SubmitEvent]:
        source = admission.source_network(context.peer())
        refusal = admission.admit_source(source, self._jobs.arrivals(source), self._jobs.held(source), self._policy)
        if refusal:
            del request
            await self._tarpit()
            await self._refuse(context, refusal)
        self._jobs.arrive(source)
        job = admission.open_job(request, source)
        if isinstance(job, Refusal):
            await self._refuse(context, job)
        client = job.client_key
        refusal = admission.admit(job, self._policy, self._jobs.load(client), int(time.time() * 1000))
        if refusal:
            await self._refuse(context, refusal, client)
        self._jobs.reserve(job)
        self._jobs.preparing(job)
        preparation = asyncio.ensure_future(self._prepare_and_register(job))
        try:
            while not preparation.done():
                await asyncio.wait([preparation], timeout=self._heartbeat_s)
                if not preparation.done():
                    # The prompt waits for a tokenizer thread (smallest first: a large one may wait
                    # long): say so, or the client's idle timeout leaves this worker for silent.
                    yield self._jobs.progress_before_start()
            generation = preparation.result()
        except BaseException:
            # Its own cleanup first (a tokenization run to its end, a registered id forgotten), then
            # the client's quota is given back.
            preparation.cancel()
            await asyncio.gather(preparation, return_exceptions=True)
            self._jobs.withdraw(job)
            raise
        if isinstance(generation, Refusal):
            self._jobs.withdraw(job)
            await self._refuse(context, generation, client)
        running = self._jobs.start(job, generation)
        finished = False
        try:
            yield job_pb2.SubmitEvent(accepted=job_pb2.JobAccepted(
                job_id=job.request.job_id, worker_peer_id=self._policy.worker_peer_id,
                prompt_tokens=len(generation.prompt_ids), queue_position=self._jobs.place_in_line()))
            while not finished:
                try:
                    async with asyncio.timeout(self._heartbeat_s):
                        event = await running.next_event()
                except TimeoutError:
                    # Nothing to send (the job waits in line, or prefills): say so, or the client
                    # cannot tell this worker from one that took its job and went silent.
                    event = self._jobs.progress(running)
                yield event
                finished = event.HasField("result")
        finally:
            if not finished:
                # The client cancelled or its deadline passed (grpc cancels this task or closes
                # this generator): free the slot; the runner still writes the receipt.
                self._jobs.cancel(running)

    async def _prepare_and_register(self, job: SignedJob) -> GenerationRequest | Refusal:
        generation = await self._prepare(job)
        return generation if isinstance(generation, Refusal) else await self._register(job, generation)

    async def _tarpit(self) -> None:
        if self._tarpitted >= MAX_TARPITTED:
            return
        self._tarpitted += 1
        try:
            await asyncio.sleep(TARPIT_S)
        finally:
            self._tarpitted -= 1

    async def _register(self, job: SignedJob, generation: GenerationRequest) -> GenerationRequest | Refusal:
        """Record the job id as used. Last of the checks: a job refused before this leaves its id
        unused, so the client may retry it."""
        registration = asyncio.ensure_future(asyncio.to_thread(
            self._ledger.register_job, job.client_key, job.request.job_id, job.digest, job.request.expires_at_ms))
        try:
            registered = await asyncio.shield(registration)
        except asyncio.CancelledError:
            # The client went away (or its deadline passed) while the row was written. It never
            # heard the job accepted, so the id is unused again; left 'running', the row would get
            # a 'failed' receipt at the next start and a retry of the job would be refused as replayed.
            if await registration:
                await asyncio.to_thread(self._ledger.forget_job, job.client_key, job.request.job_id)
                log.info("job %s: the client left while it was registered; its id is unused again",
                         job.request.job_id.hex())
            raise
        if not registered:
            return Refusal(Reason.REPLAYED, f"job id {job.request.job_id.hex()} was already submitted by this client")
        return generation

    async def _prepare(self, job: SignedJob) -> GenerationRequest | Refusal:
        """Tokenize (off the loop, smallest prompt first: a 1 MiB prompt takes a while) and check that
        the job fits."""
        async with self._tokenize_order.slot(admission.prompt_text_bytes(job.request)):
            encoding = asyncio.get_running_loop().run_in_executor(self._tokenizing, self._encode, job.request)
            try:
                prompt_ids = await asyncio.shield(encoding)
            except ValueError as exc:
                return Refusal(Reason.MALFORMED, str(exc))
            except asyncio.CancelledError:
                # The client left (or its deadline passed), but the thread runs on: until it ends, the
                # job counts against the client's quotas and holds its thread. Freed at once, a client
                # leaving each job after 100 ms had a prompt tokenizing in every thread of the pool,
                # past its limit of concurrent jobs.
                await asyncio.gather(encoding, return_exceptions=True)
                raise
        refusal = admission.check_fit(len(prompt_ids), job.sampling, self._policy)
        if refusal:
            return refusal
        generation = admission.generation_request(job, prompt_ids, secrets.token_hex(4))
        try:
            self._engine.check(generation)
        except RequestRejected as exc:
            return admission.refusal_for_rejection(exc)
        return generation

    def _encode(self, request: job_pb2.JobRequest) -> tuple[int, ...]:
        kind = request.WhichOneof("prompt")
        if kind == "chat":
            for message in request.chat.messages:
                if message.role not in _CHAT_ROLES:
                    raise ValueError(f"chat role {quoted(message.role)} is not one of {_CHAT_ROLES}")
            return tuple(self._engine.encode_chat([{"role": m.role, "content": m.content}
                                                   for m in request.chat.messages]))
        if kind == "text":
            return tuple(self._engine.encode_text(request.text))
        vocab = len(self._engine.tokenizer)
        bad = [i for i in request.tokens.ids if i >= vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary of {vocab}")
        return tuple(request.tokens.ids)

    async def Cancel(self, request: Envelope, context: grpc.aio.ServicerContext) -> worker_pb2.CancelResponse:
        try:
            cancel = open_envelope(request, job_pb2.CancelJob)
        except EnvelopeError as exc:
            code = grpc.StatusCode.UNAUTHENTICATED if exc.reason in ("bad_signature", "bad_key") \
                else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(exc))
        if cancel.worker_peer_id != self._policy.worker_peer_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"cancel is meant for worker {quoted(cancel.worker_peer_id)}")
        if abs(cancel.issued_at_ms - time.time() * 1000) > self._policy.clock_skew_ms:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "cancel request is outside the clock window")
        # Keyed by the signer's key: only the client that submitted a job can find it to cancel it.
        running = self._jobs.find(bytes(request.public_key), cancel.job_id)
        if running is not None:
            return worker_pb2.CancelResponse(cancelled=self._jobs.cancel(running))
        if self._jobs.cancel_preparing(bytes(request.public_key), cancel.job_id):
            # Still being tokenized or registered: it starts cancelled (or is refused before that).
            return worker_pb2.CancelResponse(cancelled=True)
        if await asyncio.to_thread(self._ledger.receipt, bytes(request.public_key), cancel.job_id) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no job with this id from this client")
        return worker_pb2.CancelResponse(cancelled=False)

    async def GetCapacity(self, request: worker_pb2.GetCapacityRequest,
                          context: grpc.aio.ServicerContext) -> Envelope:
        return seal(self._identity, self._capacity())

    async def GetReceipt(self, request: worker_pb2.GetReceiptRequest, context: grpc.aio.ServicerContext) -> Envelope:
        if len(request.client_public_key) != 32 or not request.job_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "need a job_id and a 32-byte client_public_key")
        envelope = await asyncio.to_thread(self._ledger.receipt, request.client_public_key, request.job_id)
        if envelope is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no receipt for this job and client")
        return envelope

    async def Acknowledge(self, request: Envelope, context: grpc.aio.ServicerContext) -> worker_pb2.AcknowledgeResponse:
        try:
            sequence = await asyncio.to_thread(self._ledger.acknowledge, request)
        except LedgerError as exc:
            code = {"bad_signature": grpc.StatusCode.UNAUTHENTICATED, "bad_key": grpc.StatusCode.UNAUTHENTICATED,
                    "unknown_receipt": grpc.StatusCode.NOT_FOUND}.get(exc.reason, grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(code, str(exc))
        return worker_pb2.AcknowledgeResponse(sequence=sequence)
