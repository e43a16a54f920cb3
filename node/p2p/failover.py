"""Submit a job through the peer network: discover workers for the model, choose by the policy of
selection.py, check each worker's gRPC identity against its advertised peer ID, and fail over.

Failover: when a worker refuses, is unreachable, is not who its advert says, dies mid-job, goes
silent (no event, not even a progress heartbeat, for `idle_timeout_s`), or ends the job itself (its
engine failed it, or it cancelled it shutting down), the job is signed again with a NEW job id bound
to the next worker (the signed job of one worker is never replayed to another) and runs from the
start there. The abandoned job is cancelled if its worker still answers, so it stops and bills at
most the tokens it produced; a worker that died bills nothing (its ledger's crash recovery gives the
job a 'failed' receipt of 0 tokens). Only the final worker's receipt covers the returned output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dspark.v1.job_pb2 import JobRequest
from node.client import ClientError, JobRefused, JobResult, WorkerClient, WorkerSilent, checked_idle_timeout
from node.identity import Identity
from node.p2p.adverts import LiveAdvert
from node.p2p.discovery import Discovery
from node.p2p.selection import Candidate, over_caps, rank

log = logging.getLogger(__name__)

PROBE_TOP = 3            # candidates probed at once (identity check + latency) before choosing
PROBE_TIMEOUT_S = 10.0
# Once one candidate has answered its probe, how much longer the others are waited for: an endpoint
# that never answers (any advert can name one) held every job for the whole probe timeout.
PROBE_GRACE_S = 1.0
# A round probes PROBE_TOP more candidates than have failed their probes so far (3, 6, 12, ...): adverts
# whose endpoints never answer (or answer as another peer) cost a few probe timeouts, not one each.
MAX_PROBE_WIDTH = 64
# How a worker is dialled: WorkerClient.connect's signature (a long-lived caller may keep connections).
Connect = Callable[..., Awaitable[WorkerClient]]


class NoWorkerError(RuntimeError):
    """No worker could run the job; `attempts` says what happened with each one tried."""

    def __init__(self, message: str, attempts: list[Attempt]):
        super().__init__(message)
        self.attempts = attempts


@dataclass(frozen=True)
class Attempt:
    peer_id: str
    endpoint: str
    outcome: Literal["completed", "refused", "unreachable", "died", "silent"]
    detail: str = ""
    job_id: bytes = b""            # empty when no job was sent
    chunks_received: int = 0       # streamed chunks before it failed; a completed one: its output tokens
    reason: str = ""               # the worker's refusal tag (node.admission.Reason), when it gave one


@dataclass(frozen=True)
class NetworkResult:
    result: JobResult
    worker: str                    # peer ID whose receipt covers `result`
    attempts: list[Attempt]
    discovery_s: float             # join + find workers
    time_to_first_token_s: float | None   # from the call, discovery and failovers included
    candidates: list[Candidate] = field(default_factory=list)


async def _probe(candidate: Candidate, identity: Identity, tls: str, timeout_s: float,
                 connect: Connect = WorkerClient.connect) -> tuple[Candidate, WorkerClient | None, str]:
    """Dial a candidate and check that its gRPC endpoint is the advertised peer (signed advert,
    TLS fingerprint); returns the candidate with its measured latency, the client or the error."""
    started = time.monotonic()
    try:
        client = await connect(candidate.grpc_endpoint, identity, peer_id=candidate.peer_id, tls=tls,
                               timeout_s=timeout_s)
    except ClientError as exc:
        return candidate, None, str(exc)
    latency = time.monotonic() - started
    return Candidate.from_advert(client.advert, latency), client, ""


async def submit_via_network(
        identity: Identity, bootstrap: Sequence[str], model: str, prompt: dict[str, Any], *,
        mdns: bool = False, **job: Any) -> NetworkResult:
    """Join the network through `bootstrap` (or mDNS), run one job with `run_with_failover` (which
    takes the other keyword arguments), and leave. Raises DiscoveryError (cannot join) or
    NoWorkerError (every worker tried failed)."""
    started = time.monotonic()
    discovery = Discovery(identity, bootstrap, mdns=mdns)
    await discovery.start()
    try:
        return await run_with_failover(discovery, identity, model, prompt, started=started, **job)
    finally:
        await discovery.stop()


async def run_with_failover(
        discovery: Discovery, identity: Identity, model: str, prompt: dict[str, Any], *,
        max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
        stop: Sequence[str] = (), max_price_per_mtok_micros: int | None = None,
        max_price_per_gpu_second_micros: int | None = None, tls: Literal["auto", "on", "off"] = "auto",
        timeout_s: float = 600.0, idle_timeout_s: float | None = None, max_attempts: int = 3,
        on_text: Callable[[str], None] | None = None, on_failover: Callable[[Attempt], None] | None = None,
        on_worker: Callable[[str], None] | None = None,
        on_completed: Callable[[WorkerClient, JobResult], Awaitable[None]] | None = None,
        failover_after_output: bool = True, discovery_wait_s: float = 5.0,
        started: float | None = None, connect: Connect = WorkerClient.connect,
        demoted: frozenset[str] = frozenset()) -> NetworkResult:
    """Run one job on the best live worker for `model`, through an already started `discovery`
    (a long-lived client such as the gateway keeps one). `prompt` is one of {"text": str},
    {"chat": [{"role", "content"}...]}, {"token_ids": [...]} (as WorkerClient.sign_job takes).
    `on_text` gets streamed text; after a failover the text restarts (on_failover is told first),
    unless `failover_after_output` is False: then a worker dying after its first chunk ends the
    call with NoWorkerError (a caller that already forwarded the text cannot take it back).
    `on_worker` is told each worker's peer ID before the job is sent to it; `on_completed` is
    awaited with the worker's client and the verified result while the connection is still open
    (e.g. to acknowledge the receipt). `started` (monotonic) is when the caller's clock started.
    `connect` dials a worker (default WorkerClient.connect; the gateway passes its connection pool).
    `max_attempts` counts the workers sent the job; one whose probe fails is skipped without using one.
    `demoted` workers are tried after every other (selection.rank). `idle_timeout_s`: a worker that
    sends no event for that long is left for the next (None: only `timeout_s` ends a job).
    Raises NoWorkerError (every worker tried failed)."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    checked_idle_timeout(idle_timeout_s)      # refused here, not as each worker's failure
    started = time.monotonic() if started is None else started
    attempts: list[Attempt] = []
    found = await discovery.find_workers(model, wait_s=discovery_wait_s)
    discovery_s = time.monotonic() - started
    if not found:
        raise NoWorkerError(f"no live worker advertises model {model!r}", attempts)
    tried: set[str] = set()
    sent = 0     # workers sent the job: an advert that fails its probe costs no attempt (anyone can sign one)
    # One set of caps: workers above either are not chosen (they would refuse); the job is signed at
    # the chosen worker's advertised prices, which are within them (WorkerClient.sign_job).
    caps = dict(max_price_per_mtok_micros=max_price_per_mtok_micros,
                max_price_per_gpu_second_micros=max_price_per_gpu_second_micros)
    ranking = dict(caps, demoted=demoted)
    while sent < max_attempts:
        ranked = rank([a.advert for a in discovery.adverts(model)], model, exclude=frozenset(tried), **ranking)
        if not ranked:
            break
        width = min(PROBE_TOP + sum(a.outcome == "unreachable" for a in attempts), MAX_PROBE_WIDTH)
        client = await _choose(ranked[:width], identity, tls, model, ranking, attempts, tried, connect)
        if client is None:
            continue
        sent += 1
        async with client:
            if on_worker is not None:
                on_worker(client.peer_id)
            outcome = await _run_on(client, model, prompt, dict(
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                **caps), on_text, timeout_s, idle_timeout_s)
            if isinstance(outcome, JobResult) and on_completed is not None:
                await on_completed(client, outcome)
        if isinstance(outcome, JobResult):
            attempts.append(Attempt(client.peer_id, client.advert.grpc_endpoint, "completed",
                                    job_id=outcome.job_id, chunks_received=len(outcome.output_ids)))
            first = (outcome.time_to_first_token_s + (time.monotonic() - started - outcome.elapsed_s)
                     if outcome.time_to_first_token_s is not None else None)
            return NetworkResult(outcome, client.peer_id, attempts, discovery_s, first,
                                 [Candidate.from_advert(a.advert) for a in found])
        attempts.append(outcome)
        if outcome.chunks_received and not failover_after_output:
            raise NoWorkerError(f"worker {outcome.peer_id} failed after {outcome.chunks_received} chunks: "
                                f"{outcome.detail}", attempts)
        if on_failover is not None:
            on_failover(outcome)
    tried_text = ("; ".join(f"{a.peer_id}: {a.outcome} ({a.detail})" for a in attempts)
                  or _none_within_caps(discovery.adverts(model), caps))
    raise NoWorkerError(f"no worker for {model!r} completed the job: {tried_text}", attempts)


def _none_within_caps(adverts: list[LiveAdvert], caps: dict[str, int | None]) -> str:
    """Why no worker was tried, in the client's terms: which prices of which worker are above its caps
    (a bare "none eligible" would leave the client guessing which cap to raise)."""
    over = [f"{a.peer_id} charges {excess}" for a in adverts if (excess := over_caps(a.advert, **caps))]
    return "none within the price caps: " + "; ".join(over) if over else "none eligible"


async def _choose(top: list[Candidate], identity: Identity, tls: str, model: str, ranking: dict[str, Any],
                  attempts: list[Attempt], tried: set[str], connect: Connect) -> WorkerClient | None:
    """Probe the top candidates at once; keep the best verified one (latency now known), close the
    others. Candidates that fail the probe, or quote a price above the one they were chosen for, are
    recorded and excluded."""
    advertised = {c.peer_id: c for c in top}
    probes = await _probe_all(top, identity, tls, connect)
    alive: dict[str, WorkerClient] = {}
    for candidate, client, error in probes:
        if client is None:
            tried.add(candidate.peer_id)
            attempts.append(Attempt(candidate.peer_id, candidate.grpc_endpoint, "unreachable", error))
        elif raised := _raised_prices(advertised[candidate.peer_id], candidate):
            # Ranked on its network advert, it would be run at the price it quotes now: a worker could
            # gossip a low price to be chosen and charge a higher one.
            tried.add(candidate.peer_id)
            await client.close()
            attempts.append(Attempt(candidate.peer_id, candidate.grpc_endpoint, "refused",
                                    f"quotes more than its advert on the network: {raised}"))
        else:
            alive[candidate.peer_id] = client
    latencies = {c.peer_id: c.latency_s for c, client, _ in probes if client is not None}
    best = rank([client.advert for client in alive.values()], model, latencies=latencies, **ranking)
    for peer, client in alive.items():
        if not best or peer != best[0].peer_id:
            await client.close()
    if not best:  # every probed worker answered but none serves the model at that price now
        tried.update(alive)
        return None
    tried.add(best[0].peer_id)
    return alive[best[0].peer_id]


def _raised_prices(advertised: Candidate, quoted: Candidate) -> str:
    """Which unit prices the worker quotes above those of the advert it was ranked by ("" if none)."""
    raised = [f"{now} micros {unit}, not {before}" for unit, before, now in (
        ("per million tokens", advertised.price_per_mtok_micros, quoted.price_per_mtok_micros),
        ("per GPU-second", advertised.price_per_gpu_second_micros, quoted.price_per_gpu_second_micros))
        if now > before]
    return " and ".join(raised)


async def _probe_all(top: list[Candidate], identity: Identity, tls: str,
                     connect: Connect) -> list[tuple[Candidate, WorkerClient | None, str]]:
    """Probe candidates at once. After the first verified answer the others get PROBE_GRACE_S, then
    are left out of this round: not failed, only slow, so a later round may probe them again."""
    tasks = [asyncio.create_task(_probe(c, identity, tls, PROBE_TIMEOUT_S, connect)) for c in top]
    try:
        pending = set(tasks)
        while pending and not any(t.done() and t.result()[1] is not None for t in tasks):
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=PROBE_GRACE_S)
    finally:
        for task in tasks:
            task.cancel()      # those still probing (the client closes a half-open channel)
        await asyncio.gather(*tasks, return_exceptions=True)
    return [t.result() for t in tasks if not t.cancelled()]


async def _run_on(client: WorkerClient, model: str, prompt: dict[str, Any], sampling: dict[str, Any],
                  on_text: Callable[[str], None] | None, timeout_s: float,
                  idle_timeout_s: float | None) -> JobResult | Attempt:
    """Run the job on one worker; an Attempt (refused / died / silent) instead of raising."""
    job = client.sign_job(**prompt, model=model, **sampling)   # a new job id, bound to this worker
    job_id = JobRequest.FromString(job.payload).job_id
    received = 0

    def count(text: str) -> None:
        nonlocal received
        received += 1
        if on_text is not None:
            on_text(text)

    endpoint = client.advert.grpc_endpoint
    outcome = "died"
    try:
        result = await client.run(job, on_text=count, timeout_s=timeout_s, idle_timeout_s=idle_timeout_s)
    except JobRefused as exc:
        if received == 0 and exc.reason:
            return Attempt(client.peer_id, endpoint, "refused", str(exc), job_id, reason=exc.reason)
        detail = str(exc)
    except WorkerSilent as exc:     # its call is cancelled already; an honest worker stops the job on that
        outcome, detail = "silent", str(exc)
    except ClientError as exc:
        detail = str(exc)
    else:
        if result.finished:
            return result
        detail = f"the worker ended the job early ({result.finish_reason}) after {len(result.output_ids)} tokens"
    # Broken or ended early mid-job: stop the abandoned job if its worker still answers, so it bills
    # no more (a job that ended is not cancelled twice: the worker answers that it has its receipt).
    with contextlib.suppress(JobRefused, ClientError, asyncio.TimeoutError):
        await client.cancel(job_id, timeout_s=2.0)
    log.warning("worker %s failed mid-job after %d chunks: %s", client.peer_id, received, detail)
    return Attempt(client.peer_id, endpoint, outcome, detail, job_id, received)
