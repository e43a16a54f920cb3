"""Client SDK: connect to a worker, check who it is, sign jobs, stream them, verify the receipts.

Who the worker is: `connect` fetches its signed CapacityAdvert. Over TLS it first fetches the
server certificate and pins it as the channel's only root, then requires the advert, signed by the
expected peer ID (or, when none is given, by whoever signed it), to name that certificate's
fingerprint; a man in the middle would present another certificate and fail the check. A job is
sent only after this, and its receipt must be signed by the same peer ID and cover exactly the
tokens received.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import grpc

from dspark.v1 import job_pb2, worker_pb2, worker_pb2_grpc
from dspark.v1.advert_pb2 import CapacityAdvert
from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.receipt_pb2 import Receipt
from node import keepalive
from node.admission import REFUSAL_KEY
from node.config import is_loopback, split_host_port
from node.envelope import EnvelopeError, digest, open_envelope, seal
from node.identity import Identity, IdentityError, peer_id_from_public_key
from node.receipts import ReceiptError, acknowledgment, check_price_caps, verify_receipt
from node.tls import SERVER_NAME, TlsError, fetch_server_cert, fingerprint

# A job's deadline is at most a day (`submit --timeout`, the gateway's timeout_s): grpc's deadline
# overflows past some 7e9 s and then expires at once, which reads as a refusal (DEADLINE_EXCEEDED)
# of a job never sent.
MAX_JOB_TIMEOUT_S = 86400.0
GPU_TIME_SLACK_S = 0.05     # the worker's and the client's clocks are not one clock


def _deadline(timeout_s: float | None) -> float | None:
    """`timeout_s` as a call's deadline (None: none). Past MAX_JOB_TIMEOUT_S (inf and nan too) the
    caller is told so: grpc's call would fail at once, as a JobRefused that reads as the worker's."""
    if timeout_s is not None and not timeout_s <= MAX_JOB_TIMEOUT_S:
        raise ValueError(f"timeout_s must be at most {MAX_JOB_TIMEOUT_S:g} s (or None: no deadline), got {timeout_s}")
    return timeout_s


def checked_idle_timeout(idle_timeout_s: float | None) -> float | None:
    """`idle_timeout_s` checked: None (off) or a positive number of seconds up to MAX_JOB_TIMEOUT_S."""
    if idle_timeout_s is not None and not 0 < idle_timeout_s <= MAX_JOB_TIMEOUT_S:    # also refuses nan
        raise ValueError(f"idle_timeout_s must be a positive number of seconds up to {MAX_JOB_TIMEOUT_S:g} "
                         f"(or None: off), got {idle_timeout_s}")
    return idle_timeout_s


def idle_timeout_problem(idle_timeout_s: float) -> str | None:
    """What is wrong with an idle timeout a person set (`submit --idle-timeout`, the gateway's
    idle_timeout_s), or None. A worker's job waiting in line sends a progress event every
    keepalive.HEARTBEAT_S: a limit at or below that would leave healthy workers that have a queue."""
    if keepalive.HEARTBEAT_S < idle_timeout_s <= MAX_JOB_TIMEOUT_S:      # also refuses nan
        return None
    return (f"must be more than {keepalive.HEARTBEAT_S:g} s (a worker sends a progress event that often while a "
            f"job waits) and at most {MAX_JOB_TIMEOUT_S:g} s, got {idle_timeout_s}")


class ClientError(Exception):
    """The worker could not be reached or is not who it must be, or its answer does not verify."""


class WorkerSilent(ClientError):
    """The worker sent nothing for the call's idle timeout (a worker sends a progress event at least
    every node.keepalive.HEARTBEAT_S while it holds a job); the call was cancelled."""


class JobRefused(Exception):
    """The worker refused the job (or the RPC failed); `reason` is the worker's tag when it gave one."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str):
        super().__init__(f"{code.name}: {message}" + (f" [{reason}]" if reason else ""))
        self.code = code
        self.reason = reason
        self.details = message


def _refusal(error: grpc.aio.AioRpcError) -> JobRefused:
    reason = dict(error.trailing_metadata() or ()).get(REFUSAL_KEY, "")
    return JobRefused(error.code(), reason, error.details() or "")


@dataclass(frozen=True)
class JobResult:
    job_id: bytes
    accepted: job_pb2.JobAccepted
    text: str
    output_ids: tuple[int, ...]
    finish_reason: str
    receipt_envelope: Envelope
    receipt: Receipt
    time_to_first_token_s: float | None
    elapsed_s: float

    @property
    def finished(self) -> bool:
        """Whether the job ran to its end (a stop string, EOS or max_new_tokens). "error" (the
        worker's engine failed it) and "cancelled" (by the worker, shutting down) also come with a
        receipt, billing what was produced, but their text is not an answer."""
        return self.finish_reason in ("stop", "length")


class WorkerClient:
    def __init__(self, channel: grpc.aio.Channel, identity: Identity, advert: CapacityAdvert):
        self._channel = channel
        self._stub = worker_pb2_grpc.WorkerStub(channel)
        self.identity = identity
        self.advert = advert
        self.peer_id = advert.peer_id

    @classmethod
    async def connect(cls, target: str, identity: Identity, peer_id: str | None = None,
                      tls: Literal["auto", "on", "off"] = "auto", timeout_s: float = 10.0) -> WorkerClient:
        """Dial `target` (HOST:PORT). TLS is required off loopback (auto) or with `tls="on"`;
        on loopback, auto uses TLS when the node offers it and plaintext otherwise."""
        try:
            host, port = split_host_port(target)
        except ValueError as exc:
            raise ClientError(str(exc)) from None
        _deadline(timeout_s)
        required = tls == "on" or (tls == "auto" and not is_loopback(host))
        cert_pem = b""
        if tls != "off":
            try:
                cert_pem = await asyncio.to_thread(fetch_server_cert, host, port, timeout_s)
            except TlsError as exc:
                if required:
                    raise ClientError(str(exc)) from None
        use_tls = bool(cert_pem)
        options = keepalive.channel_options()
        if use_tls:
            channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=cert_pem),
                                              options=[*options, ("grpc.ssl_target_name_override", SERVER_NAME)])
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        try:
            envelope = await worker_pb2_grpc.WorkerStub(channel).GetCapacity(
                worker_pb2.GetCapacityRequest(), timeout=timeout_s)
            advert = _check_advert(envelope, peer_id, fingerprint(cert_pem) if use_tls else None)
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            raise ClientError(f"cannot reach the worker at {target}: {exc.code().name}: {exc.details()}") from None
        except BaseException:   # ClientError, or cancelled (a probe outpaced by another worker's)
            await channel.close()
            raise
        return cls(channel, identity, advert)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- jobs -------------------------------------------------------------------------------------

    def sign_job(self, *, text: str | None = None, chat: Sequence[dict[str, str]] | None = None,
                 token_ids: Sequence[int] | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (), model: str | None = None,
                 max_price_per_mtok_micros: int | None = None, max_price_per_gpu_second_micros: int | None = None,
                 ttl_s: float = 300.0, job_id: bytes | None = None) -> Envelope:
        """A signed JobRequest for this worker. Exactly one of text / chat / token_ids. The model
        defaults to the advertised one. Each price the job carries is the worker's advertised price,
        or the cap given when that is lower (the worker then refuses the job); the receipt is refused
        if it charges more."""
        if sum(p is not None for p in (text, chat, token_ids)) != 1:
            raise ValueError("give exactly one of text, chat, token_ids")
        try:   # protobuf strings are UTF-8; a str holding lone surrogates (undecodable argv bytes) is not
            for piece in (text or "", *(m["content"] for m in chat or ()), *stop):
                piece.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"the prompt or a stop string is not valid UTF-8 text: character "
                             f"{exc.object[exc.start]!r} at position {exc.start} ({exc.reason})") from None
        now = int(time.time() * 1000)
        sampling = job_pb2.SamplingParams(temperature=temperature, top_p=_as_float32_top_p(top_p),
                                          max_new_tokens=max_new_tokens, stop=list(stop))
        if seed is not None:
            sampling.seed = seed
        request = job_pb2.JobRequest(
            job_id=job_id if job_id is not None else secrets.token_bytes(16), worker_peer_id=self.peer_id,
            model=model if model is not None else self.advert.models[0].id, sampling=sampling,
            max_price_per_mtok_micros=_agreed(self.advert.price_per_mtok_micros, max_price_per_mtok_micros),
            max_price_per_gpu_second_micros=_agreed(self.advert.price_per_gpu_second_micros,
                                                    max_price_per_gpu_second_micros),
            issued_at_ms=now, expires_at_ms=now + int(ttl_s * 1000))
        _set_prompt(request, text, chat, token_ids)
        return seal(self.identity, request)

    async def stream(self, job: Envelope, timeout_s: float | None = None,
                     idle_timeout_s: float | None = None) -> AsyncIterator[job_pb2.SubmitEvent]:
        """The raw event stream, progress events included; raises JobRefused on a refusal or a failed
        RPC, and WorkerSilent (the call cancelled) when no event came for `idle_timeout_s`."""
        idle = checked_idle_timeout(idle_timeout_s)
        call = self._stub.Submit(job, timeout=_deadline(timeout_s))
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):
                        event = await call.read()
                except TimeoutError:
                    raise WorkerSilent(f"the worker sent nothing for {idle:g} s (idle_timeout_s); "
                                       "the call is cancelled") from None
                if event is grpc.aio.EOF:
                    return
                yield event
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
        finally:
            call.cancel()

    async def run(self, job: Envelope, on_text: Callable[[str], None] | None = None,
                  timeout_s: float | None = None, idle_timeout_s: float | None = None) -> JobResult:
        """Submit, stream (text to `on_text` as it comes), and verify the receipt; raises
        JobRefused on refusal, WorkerSilent when no event came for `idle_timeout_s` (None: wait
        up to the deadline), and ClientError when the result does not verify."""
        started = time.monotonic()
        first_token: float | None = None
        accepted = job_pb2.JobAccepted()
        streamed: list[int] = []
        # Progress events only prove the worker alive; an event this client does not know (a newer
        # worker's) reads as no member set. Both are skipped.
        async for event in self.stream(job, timeout_s, idle_timeout_s):
            kind = event.WhichOneof("event")
            if kind == "accepted":
                accepted = event.accepted
            elif kind == "chunk":
                if first_token is None:
                    first_token = time.monotonic() - started
                streamed.extend(event.chunk.token_ids)
                if on_text is not None:
                    on_text(event.chunk.text)
            elif kind == "result":
                return self._verify(job, accepted, event.result, streamed, first_token, time.monotonic() - started)
        raise ClientError("the worker closed the stream without a result")

    def _verify(self, job: Envelope, accepted: job_pb2.JobAccepted, result: job_pb2.JobResult,
                streamed: list[int], first_token: float | None, elapsed: float) -> JobResult:
        output_ids = tuple(result.output_token_ids)
        if output_ids != tuple(streamed):
            raise ClientError("the result's token ids differ from the tokens streamed")
        if not result.HasField("receipt"):
            raise ClientError(f"the job ended ({result.finish_reason}) without a receipt")
        receipt = self._check_receipt(result.receipt, job, output_ids)   # its job_id is the job's (checked)
        # The worker states the GPU time it bills; the job cannot have held its device longer than this
        # client waited for it. At an agreed time price, inflated seconds were an overcharge by the rule.
        if receipt.gpu_seconds > elapsed + GPU_TIME_SLACK_S:
            raise ClientError(f"receipt bills {receipt.gpu_seconds:g} GPU-seconds for a job that took "
                              f"{elapsed:.3f} s")
        return JobResult(job_id=receipt.job_id, accepted=accepted, text=result.text, output_ids=output_ids,
                         finish_reason=result.finish_reason, receipt_envelope=result.receipt, receipt=receipt,
                         time_to_first_token_s=first_token, elapsed_s=elapsed)

    def _check_receipt(self, envelope: Envelope, job: Envelope, output_ids: Sequence[int] | None) -> Receipt:
        """The receipt is the worker's, bills by the rule (for `output_ids` when given), is for this
        client's `job`, and charges no unit price above the caps the job carries."""
        try:
            receipt = verify_receipt(envelope, self.peer_id, output_ids)
        except ReceiptError as exc:
            raise ClientError(f"receipt does not verify: {exc}") from None
        request = job_pb2.JobRequest.FromString(job.payload)
        if receipt.job_digest != digest(job) or receipt.job_id != request.job_id:
            raise ClientError("the receipt is for another job")
        if receipt.client_public_key != self.identity.public_key:
            raise ClientError("the receipt is for another client")
        try:
            check_price_caps(receipt, request.max_price_per_mtok_micros, request.max_price_per_gpu_second_micros)
        except ReceiptError as exc:
            raise ClientError(f"receipt refused: {exc}") from None
        return receipt

    async def cancel(self, job_id: bytes, timeout_s: float = 10.0) -> bool:
        envelope = seal(self.identity, job_pb2.CancelJob(job_id=job_id, worker_peer_id=self.peer_id,
                                                         issued_at_ms=int(time.time() * 1000)))
        try:
            return (await self._stub.Cancel(envelope, timeout=_deadline(timeout_s))).cancelled
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None

    async def get_receipt(self, job: Envelope, timeout_s: float = 10.0) -> Receipt:
        """Fetch the receipt of one of this client's signed jobs (e.g. after a disconnect), checked as
        a streamed one is, except for the output tokens the client never received. The job itself is
        needed, not its id: it is what the receipt must be bound to and it holds the price caps."""
        job_id = job_pb2.JobRequest.FromString(job.payload).job_id
        try:
            envelope = await self._stub.GetReceipt(worker_pb2.GetReceiptRequest(
                job_id=job_id, client_public_key=self.identity.public_key), timeout=_deadline(timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
        return self._check_receipt(envelope, job, None)

    async def acknowledge(self, receipt_envelope: Envelope, timeout_s: float = 10.0,
                          ack: Envelope | None = None) -> int:
        """Countersign a receipt this client accepted; returns its ledger sequence. `ack`: an
        acknowledgment already built with node.receipts.acknowledgment (a caller that keeps a copy)."""
        if ack is None:
            ack = acknowledgment(self.identity, receipt_envelope)
        try:
            response = await self._stub.Acknowledge(ack, timeout=_deadline(timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
        return response.sequence

    async def capacity(self, timeout_s: float = 10.0) -> CapacityAdvert:
        try:
            envelope = await self._stub.GetCapacity(worker_pb2.GetCapacityRequest(), timeout=_deadline(timeout_s))
        except grpc.aio.AioRpcError as exc:
            raise _refusal(exc) from None
        return _check_advert(envelope, self.peer_id, None)


_MIN_FLOAT32 = 1.401298464324817e-45      # the smallest positive float32


def _as_float32_top_p(top_p: float) -> float:
    """top_p for the job's float32 field. A positive top_p under the smallest float32 would be signed
    as 0, which the worker reads as "no nucleus filter" (1): the smallest float32 keeps, as the tiny
    value asked, the likeliest token alone."""
    return max(top_p, _MIN_FLOAT32) if top_p > 0 else top_p


def _set_prompt(request: job_pb2.JobRequest, text: str | None, chat: Sequence[dict[str, str]] | None,
                token_ids: Sequence[int] | None) -> None:
    if text is not None:
        request.text = text
    elif chat is not None:
        request.chat.messages.extend(job_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in chat)
    else:
        request.tokens.ids.extend(token_ids)


def prompt_bytes(*, text: str | None = None, chat: Sequence[dict[str, str]] | None = None,
                 token_ids: Sequence[int] | None = None) -> int:
    """The bytes a prompt (as sign_job takes it) adds to a signed job, whose payload a worker takes up
    to node.envelope.MAX_PAYLOAD_BYTES."""
    request = job_pb2.JobRequest()
    _set_prompt(request, text, chat, token_ids)
    return request.ByteSize()


def _agreed(advertised: int, cap: int | None) -> int:
    """The price a job offers: what the worker advertised, never more than the client's cap. Signing
    the cap itself would let a worker bill up to it after advertising less; one that raised its price
    since the advert refuses the job instead (price_too_low), and the client tries another."""
    return advertised if cap is None else min(cap, advertised)


def _check_advert(envelope: Envelope, peer_id: str | None, cert_sha256: bytes | None) -> CapacityAdvert:
    try:
        advert = open_envelope(envelope, CapacityAdvert)
        signer = peer_id_from_public_key(bytes(envelope.public_key))
    except (EnvelopeError, IdentityError) as exc:
        raise ClientError(f"the worker's capacity advert does not verify: {exc}") from None
    if advert.peer_id != signer:
        raise ClientError(f"the advert names peer {advert.peer_id!r} but is signed by {signer}")
    if peer_id is not None and signer != peer_id:
        raise ClientError(f"the worker is {signer}, not the expected {peer_id}")
    if cert_sha256 is not None and advert.tls_cert_sha256 != cert_sha256:
        raise ClientError("the worker's TLS certificate is not the one its signed advert names "
                          "(possible interception)")
    if not advert.models:
        raise ClientError("the worker advertises no model")
    return advert
