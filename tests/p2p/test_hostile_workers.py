"""Choosing and paying a worker among hostile or broken ones, on real libp2p hosts (loopback) and
real gRPC: adverts whose endpoints do not answer or belong to another worker, a worker that bills
more GPU time than the job took, one that quotes more than it advertised, one that takes the job
and then sends nothing, and one that refuses the client's acknowledgment. The client must still run
on, and pay, the honest worker as agreed."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from pathlib import Path

import grpc
import pytest

from dspark.v1.envelope_pb2 import Envelope
from node.client import WorkerClient, WorkerSilent
from node.p2p.failover import PROBE_GRACE_S, NoWorkerError, run_with_failover
from node.receipts import verify_receipt
from tests.gateway.test_gateway_price_caps import _TimeWorker
from tests.p2p.hostile import (honest_worker, joined, relay_holding, serving, signed, silent_endpoint, silent_worker,
                               sybil_advert)
from tests.receipts.receipts_helpers import CLIENT, WORKER

ROOT = Path(__file__).resolve().parents[2]


async def run_job(discovery):
    return await run_with_failover(discovery, CLIENT, "m", {"text": "hi"}, max_new_tokens=4, tls="off")


@pytest.mark.asyncio
async def test_a_cheap_advert_whose_endpoint_never_answers_does_not_hold_every_job_for_the_probe_timeout():
    """A throwaway key advertises the lowest price at an endpoint that accepts and never answers. The
    client probed its top three and waited for all of them: every job started 10 s late (the probe
    timeout). Once a candidate has answered, the others get a short grace; the job runs at once."""
    async with honest_worker() as worker, silent_endpoint() as silent:
        honest = signed(worker.advert(), WORKER)
        async with relay_holding([honest, sybil_advert(silent)]) as relay, joined(relay.listen_addrs()) as discovery:
            started = time.monotonic()
            outcome = await run_job(discovery)
            elapsed = time.monotonic() - started
    assert outcome.worker == WORKER.peer_id and outcome.result.finished
    assert elapsed < PROBE_GRACE_S + 3
    assert [a.outcome for a in outcome.attempts] == ["completed"]   # the silent one was not tried


@pytest.mark.asyncio
async def test_adverts_whose_endpoints_fail_the_probe_do_not_use_up_the_attempts():
    """Three cheap adverts: two point at a closed port, one at the honest worker's endpoint under
    another peer ID (the probe's identity check refuses it). None is sent the job, so none uses up one
    of the 3 attempts: the job runs on the honest worker (it ended in 'no worker completed the job')."""
    async with honest_worker() as worker:
        honest = signed(worker.advert(), WORKER)
        sybils = [sybil_advert("127.0.0.1:1"), sybil_advert("127.0.0.1:1"), sybil_advert(worker.endpoint)]
        async with relay_holding([honest, *sybils]) as relay, joined(relay.listen_addrs()) as discovery:
            outcome = await run_job(discovery)
    assert outcome.worker == WORKER.peer_id and outcome.result.finished
    probed = [a for a in outcome.attempts if a.outcome == "unreachable"]
    assert len(probed) == 3 and outcome.attempts[-1].outcome == "completed"
    assert any(f"not the expected {a.peer_id}" in a.detail for a in probed)   # the impersonation was caught


@pytest.mark.asyncio
async def test_a_receipt_billing_more_gpu_time_than_the_job_took_is_refused():
    """A worker that prices time at what it advertised bills 5 GPU-seconds for a job the client saw
    end in milliseconds: the amount follows the billing rule at an agreed price, so the receipt was
    accepted. It is refused (and no job completes there); billing its real time, it is accepted."""
    async with honest_worker() as worker:
        worker.advertised = worker.charged = 1_000
        worker.gpu_seconds = 5.0
        async with relay_holding([signed(worker.advert(), WORKER)]) as relay, \
                joined(relay.listen_addrs()) as discovery:
            with pytest.raises(NoWorkerError) as refused:
                await run_job(discovery)
            worker.gpu_seconds = 0.001
            outcome = await run_job(discovery)
    assert "receipt bills 5 GPU-seconds for a job that took" in str(refused.value)
    assert outcome.result.receipt.gpu_seconds == 0.001 and outcome.result.receipt.price_per_gpu_second_micros == 1_000


@pytest.mark.asyncio
async def test_a_worker_quoting_more_than_it_advertised_on_the_network_is_not_sent_the_job():
    """Bait and switch: the worker gossips 1 micro per million tokens to be ranked first, and its
    GetCapacity quotes 100,000. The client ranked on the gossip used to sign the job at the quote."""
    async with honest_worker() as worker:
        bait = worker.advert()
        bait.price_per_mtok_micros = 1
        async with relay_holding([signed(bait, WORKER)]) as relay, joined(relay.listen_addrs()) as discovery:
            with pytest.raises(NoWorkerError) as failed:
                await run_job(discovery)
    (attempt,) = failed.value.attempts
    assert (attempt.peer_id, attempt.outcome) == (WORKER.peer_id, "refused")
    assert "quotes more than its advert on the network: 100000 micros per million tokens, not 1" in attempt.detail
    assert worker.caps == []        # no job was sent


@pytest.mark.asyncio
async def test_a_worker_that_takes_the_job_and_goes_silent_is_given_up_at_the_idle_timeout():
    """It answers the connection's pings, so keepalive holds: the client waited for the job's whole
    deadline (600 s at the gateway). With an idle timeout the call ends once nothing came for it, and
    is cancelled (the worker's Submit sees it)."""
    async with silent_worker() as worker:
        async with await WorkerClient.connect(worker.endpoint, CLIENT, peer_id=worker.identity.peer_id,
                                              tls="off") as client:
            started = time.monotonic()
            with pytest.raises(WorkerSilent, match="sent nothing for 1 s"):
                await client.run(client.sign_job(text="hi", max_new_tokens=4), timeout_s=60, idle_timeout_s=1)
            assert 1 <= time.monotonic() - started < 2.5
            await asyncio.wait_for(worker.abandoned.wait(), 5)
            assert worker.holding == 0


@pytest.mark.asyncio
async def test_failover_leaves_a_silent_worker_for_the_next_one():
    """The silent worker is the cheapest, so it is chosen first; the job moves on to the honest worker
    after the idle timeout, not after timeout_s."""
    async with silent_worker() as silent, honest_worker() as worker:
        adverts = [signed(silent.advert(), silent.identity), signed(worker.advert(), WORKER)]
        async with relay_holding(adverts) as relay, joined(relay.listen_addrs()) as discovery:
            started = time.monotonic()
            outcome = await run_with_failover(discovery, CLIENT, "m", {"text": "hi"}, max_new_tokens=4, tls="off",
                                              timeout_s=60, idle_timeout_s=1)
            elapsed = time.monotonic() - started
            await asyncio.wait_for(silent.abandoned.wait(), 5)
    assert outcome.worker == WORKER.peer_id and outcome.result.finished
    assert [(a.peer_id, a.outcome) for a in outcome.attempts] == [(silent.identity.peer_id, "silent"),
                                                                 (WORKER.peer_id, "completed")]
    assert elapsed < 10 and silent.holding == 0


@pytest.mark.parametrize("idle_timeout_s", [0, -1, float("nan"), float("inf")])
@pytest.mark.asyncio
async def test_an_idle_timeout_that_is_not_a_positive_number_of_seconds_is_refused(idle_timeout_s):
    async with honest_worker() as worker:
        async with await WorkerClient.connect(worker.endpoint, CLIENT, peer_id=WORKER.peer_id, tls="off") as client:
            with pytest.raises(ValueError, match="idle_timeout_s must be a positive number of seconds"):
                await client.run(client.sign_job(text="hi", max_new_tokens=4), idle_timeout_s=idle_timeout_s)
        with pytest.raises(ValueError, match="idle_timeout_s must be a positive number of seconds"):
            await run_with_failover(None, CLIENT, "m", {"text": "hi"}, idle_timeout_s=idle_timeout_s)
    assert worker.caps == []        # refused before any job was sent


class _AckRefusingWorker(_TimeWorker):
    """Completes the job and signs its receipt, then refuses the client's acknowledgment of it (its
    ledger unavailable, or the network gone between the two calls)."""

    async def Acknowledge(self, request, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, "ledger unavailable")


@pytest.mark.parametrize("path", ["--node", "network"])
@pytest.mark.asyncio
async def test_submit_keeps_the_answer_and_the_receipt_of_a_worker_refusing_the_acknowledgment(tmp_path, path):
    """The real CLI, in a child process, on both paths: exit 0 with the answer, a warning, and the
    receipt written without an acknowledgment."""
    key, out = tmp_path / "client.key", tmp_path / "receipt.json"
    CLIENT.save(key)        # the key the worker's receipts are for
    async with serving(_AckRefusingWorker(0, 0)) as worker, relay_holding([signed(worker.advert(), WORKER)]) as relay:
        where = (["--node", worker.endpoint] if path == "--node"
                 else ["--model", "m", "--bootstrap", relay.listen_addrs()[0]])
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "node.cli", "submit", *where, "--tls", "off", "--key", str(key), "--prompt", "hi",
            "--raw", "--receipt-out", str(out), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        answer, err = (data.decode() for data in await asyncio.wait_for(child.communicate(), 120))
    assert (child.returncode, answer) == (0, "abcd\n"), err
    assert ("dspark-node submit: warning: the worker did not take the acknowledgment of receipt #1 "
            "(UNAVAILABLE: ledger unavailable)") in err
    assert "receipt #1 verified" in err and f"receipt #1 written to {out}" in err
    record = json.loads(out.read_text())
    assert (record["acknowledgment"], record["acknowledged"]) == (None, False)
    assert verify_receipt(Envelope.FromString(base64.b64decode(record["envelope"])), WORKER.peer_id).sequence == 1
