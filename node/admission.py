"""Admission: which signed jobs this node accepts, as pure functions returning typed refusals.

No I/O here. The service gathers the inputs (policy from config, the load it tracks, the clock,
the prompt length once tokenized), calls these, and maps a `Refusal` to a gRPC status. The
persistent replay check (Ledger.register_job) is the one check that needs storage, so the
service runs it last, after everything here has passed.
"""

from __future__ import annotations

import ipaddress
import math
import urllib.parse
from dataclasses import dataclass
from enum import StrEnum

from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.job_pb2 import JobRequest
from engine.api import GenerationRequest, RequestRejected, SamplingParams
from node.config import model_id
from node.envelope import EnvelopeError, digest, open_envelope, quoted

JOB_ID_BYTES = 16
# Trailing-metadata key under which a refused RPC carries its Reason (for programs; people read the message).
REFUSAL_KEY = "dspark-refusal"


class Reason(StrEnum):
    BAD_SIGNATURE = "bad_signature"
    MALFORMED = "malformed"
    WRONG_WORKER = "wrong_worker"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REPLAYED = "replayed"
    NOT_ALLOWED = "not_allowed"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONCURRENT = "too_many_concurrent"
    QUEUE_FULL = "queue_full"
    UNKNOWN_MODEL = "unknown_model"
    TOO_LONG = "too_long"
    BAD_SAMPLING = "bad_sampling"
    PRICE_TOO_LOW = "price_too_low"
    SHUTTING_DOWN = "shutting_down"


# Refusals of the request itself, which every worker would give alike: no fault of the worker's (a
# client fails over past them in vain; the gateway answers them as the request's error).
REQUEST_FAULTS = frozenset({Reason.TOO_LONG, Reason.BAD_SAMPLING, Reason.MALFORMED})


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    message: str


@dataclass(frozen=True)
class Policy:
    """What the node accepts; built once from NodeConfig and the engine's info."""
    worker_peer_id: str
    model_id: str
    max_context: int
    max_new_tokens_limit: int
    price_per_mtok_micros: int
    mode: str                         # "open" | "allowlist" | "denylist"
    allow: frozenset[bytes]
    deny: frozenset[bytes]
    rate_per_minute: int
    max_concurrent_per_client: int
    max_queue: int
    clock_skew_ms: int
    # The most UTF-8 bytes of prompt text one token of the model stands for (node/service.py
    # longest_token_bytes): with max_context, what bounds a prompt before it is tokenized.
    longest_token_bytes: int
    price_per_gpu_second_micros: int = 0
    address_rate_per_minute: int = 0  # Submit calls per source network per minute; 0: no limit
    max_concurrent_per_address: int = 0  # jobs held (preparing, waiting, running) per source network; 0: no limit


@dataclass(frozen=True)
class Load:
    """The node's state that admission depends on, as the service sees it right now."""
    client_active: int                # this client's jobs still running
    client_recent: int                # this client's jobs admitted in the last 60 s
    queue_depth: int                  # jobs waiting for an engine slot (all max_batch taken)
    draining: bool = False


@dataclass(frozen=True)
class SignedJob:
    envelope: Envelope
    request: JobRequest
    client_key: bytes
    digest: bytes                     # sha256 of the envelope (receipts bind it)
    sampling: SamplingParams
    source: str                       # the network the Submit call came from (source_network)


def source_network(peer: str) -> str:
    """Where a Submit call comes from, as the address limit counts it: the IPv4 address, or the IPv6
    /64 (one host's prefix: a client given a /64 has 2^64 addresses to call from). `peer` is gRPC's
    `context.peer()`: "ipv4:1.2.3.4:5678", "ipv6:%5B::1%5D:5678"; any other kind (a Unix socket)
    is one source."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = urllib.parse.unquote(rest).rpartition(":")[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:    # a dual-stack socket's IPv4 client
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def admit_source(source: str, arrivals: int, held: int, policy: Policy) -> Refusal | None:
    """The limits per source network, checked before the signature: keys are free, so the limits per
    client alone do not bound the work, nor the share of the queue, that one host signing each job
    with a fresh key takes. Without the second, one address filled the queue with valid jobs and every
    other client was refused as `queue_full` (docs/benchmarks.md, "Jobs held per address")."""
    if policy.max_concurrent_per_address and held >= policy.max_concurrent_per_address:
        return Refusal(Reason.TOO_MANY_CONCURRENT, f"{source} already has {held} job(s) running or waiting "
                                                   f"(limit {policy.max_concurrent_per_address} per address)")
    if policy.address_rate_per_minute and arrivals >= policy.address_rate_per_minute:
        return Refusal(Reason.RATE_LIMITED, f"{source} sent {arrivals} jobs in the last minute "
                                            f"(limit {policy.address_rate_per_minute} per address)")
    return None


def open_job(envelope: Envelope, source: str = "local") -> SignedJob | Refusal:
    """Verify the signature over the exact payload bytes, then parse and check the fields. `source`
    is where the call came from (source_network), for the limits per address."""
    try:
        request = open_envelope(envelope, JobRequest)
    except EnvelopeError as exc:
        reason = Reason.BAD_SIGNATURE if exc.reason in ("bad_signature", "bad_key") else Reason.MALFORMED
        return Refusal(reason, str(exc))
    if len(request.job_id) != JOB_ID_BYTES:
        return Refusal(Reason.MALFORMED, f"job_id must be {JOB_ID_BYTES} bytes, got {len(request.job_id)}")
    if request.WhichOneof("prompt") is None:
        return Refusal(Reason.MALFORMED, "the job has no prompt (chat, text or tokens)")
    if request.WhichOneof("prompt") == "chat" and not request.chat.messages:
        return Refusal(Reason.MALFORMED, "the chat prompt has no messages")
    if request.expires_at_ms <= request.issued_at_ms:
        return Refusal(Reason.MALFORMED, "expires_at_ms must be after issued_at_ms")
    s = request.sampling
    # proto3 floats arrive as 0 when unset: top_p 0 means "no nucleus filter", like 1. Only 0: a
    # negative or NaN top_p is kept, for the sampling checks to refuse.
    sampling = SamplingParams(temperature=s.temperature, top_p=s.top_p if s.top_p != 0 else 1.0,
                              max_new_tokens=s.max_new_tokens,
                              seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop))
    if not math.isfinite(sampling.temperature) or not math.isfinite(sampling.top_p):
        return Refusal(Reason.BAD_SAMPLING, "temperature and top_p must be finite numbers")
    return SignedJob(envelope=envelope, request=request, client_key=bytes(envelope.public_key),
                     digest=digest(envelope), sampling=sampling, source=source)


def admit(job: SignedJob, policy: Policy, load: Load, now_ms: int) -> Refusal | None:
    """Every check that needs no tokenizer and no storage, cheapest and least revealing first."""
    request = job.request
    if load.draining:
        return Refusal(Reason.SHUTTING_DOWN, "the node is shutting down and admits no new jobs")
    if request.worker_peer_id != policy.worker_peer_id:
        return Refusal(Reason.WRONG_WORKER, f"job is meant for worker {quoted(request.worker_peer_id)}, "
                                            f"this is {policy.worker_peer_id}")
    if request.issued_at_ms > now_ms + policy.clock_skew_ms:
        return Refusal(Reason.NOT_YET_VALID, f"job is issued {(request.issued_at_ms - now_ms) / 1000:.1f} s in "
                                             f"the future (allowed skew {policy.clock_skew_ms / 1000:.0f} s)")
    if request.expires_at_ms + policy.clock_skew_ms < now_ms:
        return Refusal(Reason.EXPIRED, f"job expired {(now_ms - request.expires_at_ms) / 1000:.1f} s ago")
    refusal = _check_client(job.client_key, policy)
    if refusal is None:
        refusal = _check_offer(job, policy)
    if refusal is None:
        refusal = _check_load(policy, load)
    return refusal


def _check_client(client_key: bytes, policy: Policy) -> Refusal | None:
    if policy.mode == "allowlist" and client_key not in policy.allow:
        return Refusal(Reason.NOT_ALLOWED, "this node serves only allowlisted clients")
    if policy.mode == "denylist" and client_key in policy.deny:
        return Refusal(Reason.NOT_ALLOWED, "this client is denied by the node's operator")
    return None


def _check_offer(job: SignedJob, policy: Policy) -> Refusal | None:
    request = job.request
    if model_id(request.model) != policy.model_id:
        return Refusal(Reason.UNKNOWN_MODEL, f"model {quoted(request.model)} is not served here "
                                             f"(this node serves {policy.model_id!r})")
    if request.max_price_per_mtok_micros < policy.price_per_mtok_micros:
        return Refusal(Reason.PRICE_TOO_LOW, f"price cap {request.max_price_per_mtok_micros} is below this node's "
                                             f"price of {policy.price_per_mtok_micros} micros per million tokens")
    if request.max_price_per_gpu_second_micros < policy.price_per_gpu_second_micros:
        # Checked here, not left to the client's receipt check, so no compute is spent on a job
        # whose receipt the client would refuse.
        return Refusal(Reason.PRICE_TOO_LOW, f"GPU-second price cap {request.max_price_per_gpu_second_micros} is "
                                             f"below this node's price of {policy.price_per_gpu_second_micros} "
                                             "micros per GPU-second")
    try:
        job.sampling.validate(policy.max_new_tokens_limit)
    except RequestRejected as exc:
        return refusal_for_rejection(exc)
    return _check_prompt_size(request, policy)


def _check_prompt_size(request: JobRequest, policy: Policy) -> Refusal | None:
    """A prompt that cannot fit the context whatever it tokenizes to, refused before it is. Rendering
    a chat template is Python holding the GIL: a 1 MiB chat of 120k empty messages took 3.4 s to
    tokenize, and four at once made another client's job 5x slower. A chat message renders to at
    least one token (its role's markers), and no token covers more than `longest_token_bytes` of
    text, so past either bound the prompt alone is longer than the context."""
    limit, kind = policy.max_context, request.WhichOneof("prompt")
    if kind == "tokens" and len(request.tokens.ids) > limit:
        return Refusal(Reason.TOO_LONG, f"the prompt's {len(request.tokens.ids)} tokens exceed the context of "
                                        f"{limit} tokens")
    if kind == "chat" and len(request.chat.messages) > limit:
        return Refusal(Reason.TOO_LONG, f"the prompt's {len(request.chat.messages)} chat messages, at least one "
                                        f"token each, exceed the context of {limit} tokens")
    if kind != "tokens":
        size = prompt_text_bytes(request)
        if size > limit * policy.longest_token_bytes:
            return Refusal(Reason.TOO_LONG, f"the prompt's {size} bytes are more than the context of {limit} tokens "
                                            f"can hold (no token covers more than {policy.longest_token_bytes} bytes)")
    return None


def prompt_text_bytes(request: JobRequest) -> int:
    """The UTF-8 bytes of text the prompt has to be tokenized from (a chat's contents; none for
    token ids), which is about what tokenizing it costs."""
    kind = request.WhichOneof("prompt")
    if kind == "tokens":
        return 0
    text = request.text if kind == "text" else "".join(m.content for m in request.chat.messages)
    return len(text.encode())


def _check_load(policy: Policy, load: Load) -> Refusal | None:
    if load.client_active >= policy.max_concurrent_per_client:
        return Refusal(Reason.TOO_MANY_CONCURRENT, f"this client already has {load.client_active} jobs running "
                                                   f"(limit {policy.max_concurrent_per_client})")
    if load.client_recent >= policy.rate_per_minute:
        return Refusal(Reason.RATE_LIMITED, f"this client submitted {load.client_recent} jobs in the last minute "
                                            f"(limit {policy.rate_per_minute})")
    if load.queue_depth >= policy.max_queue:
        return Refusal(Reason.QUEUE_FULL, f"{load.queue_depth} jobs are already waiting (limit {policy.max_queue})")
    return None


def check_fit(prompt_tokens: int, sampling: SamplingParams, policy: Policy) -> Refusal | None:
    """Once the prompt is tokenized: prompt + new tokens must fit the context."""
    if prompt_tokens == 0:
        return Refusal(Reason.MALFORMED, "the prompt is empty")
    needed = prompt_tokens + sampling.max_new_tokens
    if needed > policy.max_context:
        return Refusal(Reason.TOO_LONG, f"prompt ({prompt_tokens} tokens) + max_new_tokens "
                                        f"({sampling.max_new_tokens}) = {needed} exceeds the context of "
                                        f"{policy.max_context}")
    return None


def generation_request(job: SignedJob, prompt_ids: tuple[int, ...], nonce: str) -> GenerationRequest:
    """What the engine runs for an admitted job. Its corpus scope is the client: a client's jobs may
    draft from each other's text (engine/drafters/corpus.py), never from another client's, whose
    content their speed would otherwise hint at. Its tenant is the source address: slots go to the
    address holding the fewest first, so one host signing its jobs with many keys takes turns with
    the others instead of making them wait behind all its jobs."""
    return GenerationRequest(request_id=f"{job.request.job_id.hex()}-{nonce}", prompt_ids=prompt_ids,
                             sampling=job.sampling, corpus_scope=job.client_key.hex(), tenant=job.source)


# The engine's reasons (engine/engine.py check, engine/api.py SamplingParams.validate) as the node's.
_ENGINE_REASONS = {"too_long": Reason.TOO_LONG, "bad_sampling": Reason.BAD_SAMPLING,
                   "empty_prompt": Reason.MALFORMED, "bad_tokens": Reason.MALFORMED}


def refusal_for_rejection(exc: RequestRejected) -> Refusal:
    """The engine's own last word (context, sampling values, token ids) as a refusal."""
    return Refusal(_ENGINE_REASONS[exc.reason], str(exc))
