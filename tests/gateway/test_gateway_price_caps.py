"""The gateway's GPU-second cap against a worker that prices time, in process: a gRPC worker over a
real socket that advertises one GPU-second price and bills another, seen through a stand-in for the
peer network. An honest worker cannot show the receipt check (it refuses a job below its price), so
the receipts here are signed by the test's WORKER key at whatever price the case needs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from dspark.v1 import job_pb2, worker_pb2, worker_pb2_grpc
from dspark.v1.advert_pb2 import CapacityAdvert, ModelOffer
from node.envelope import seal
from node.gateway.config import GatewayConfig
from node.gateway.errors import ApiError
from node.gateway.gateway import Gateway
from node.gateway.openai_schema import parse_request
from node.gateway.receipt_store import LOCAL_KEY
from node.p2p.adverts import LiveAdvert
from tests.receipts.receipts_helpers import CLIENT, WORKER, worker_answer

CAP = 1_000
CHAT = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


class _TimeWorker(worker_pb2_grpc.WorkerServicer):
    """Advertises `advertised` micros per GPU-second and bills each job at `charged`, for `gpu_seconds`
    (a job here takes milliseconds: a worker billing more time than the client waited is caught)."""

    def __init__(self, advertised: int, charged: int, gpu_seconds: float = 0.001):
        self.advertised, self.charged, self.gpu_seconds = advertised, charged, gpu_seconds
        self.endpoint = ""
        self.caps: list[int] = []       # the GPU-second cap each job it was sent carries

    def advert(self) -> CapacityAdvert:
        return CapacityAdvert(peer_id=WORKER.peer_id, grpc_endpoint=self.endpoint, models=[ModelOffer(id="m")],
                              price_per_mtok_micros=100_000, price_per_gpu_second_micros=self.advertised,
                              free_slots=1)

    async def GetCapacity(self, request, context):
        return seal(WORKER, self.advert())

    async def Submit(self, job, context):
        self.caps.append(job_pb2.JobRequest.FromString(job.payload).max_price_per_gpu_second_micros)
        result = worker_answer(job, 100_000, self.charged, self.gpu_seconds)
        yield job_pb2.SubmitEvent(accepted=job_pb2.JobAccepted(worker_peer_id=WORKER.peer_id))
        yield job_pb2.SubmitEvent(chunk=job_pb2.TokenChunk(token_ids=result.output_token_ids, text="abcd"))
        yield job_pb2.SubmitEvent(result=result)

    async def Cancel(self, request, context):
        return worker_pb2.CancelResponse(cancelled=False)

    async def Acknowledge(self, request, context):
        return worker_pb2.AcknowledgeResponse(sequence=1)


class _Network:
    """What Discovery would hold: the one worker's current advert."""

    def __init__(self, worker: _TimeWorker):
        self.worker = worker

    def adverts(self, model: str | None = None) -> list[LiveAdvert]:
        envelope = seal(WORKER, self.worker.advert())
        return [LiveAdvert(self.worker.advert(), envelope, 2**62)] if model in (None, "m") else []

    async def find_workers(self, model: str, wait_s: float = 0.0) -> list[LiveAdvert]:
        return self.adverts(model)

    async def stop(self) -> None:
        pass


@contextlib.asynccontextmanager
async def gateway_before(worker: _TimeWorker, data_dir) -> AsyncIterator[Gateway]:
    """A gateway with a GPU-second cap of CAP whose only visible worker is `worker`."""
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    worker.endpoint = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    gateway = Gateway(GatewayConfig(mdns=True, data_dir=data_dir, tls="off", max_price_per_gpu_second_micros=CAP),
                      CLIENT)
    gateway.discovery = _Network(worker)
    try:
        yield gateway
    finally:
        await gateway.stop()
        await server.stop(None)


@pytest.mark.asyncio
@pytest.mark.parametrize("charged", [CAP + 1, CAP])     # above the gateway's cap; within it, above the advert
async def test_a_receipt_above_the_advertised_gpu_second_price_is_refused_and_not_kept(tmp_path, charged):
    advertised = CAP // 2
    worker = _TimeWorker(advertised, charged)
    async with gateway_before(worker, tmp_path) as gateway:
        with pytest.raises(ApiError) as caught:
            await gateway.run(CHAT, LOCAL_KEY, on_text=lambda text: None)
        # The job agreed to the advertised price, not to the gateway's cap: a bill above it is refused.
        assert f"receipt charges {charged} micros per GPU-second, above the job's cap of {advertised}" \
            in caught.value.message
        assert worker.caps == [advertised] and gateway.store.rows() == []
        worker.charged = advertised                             # its advertised price: kept, and billed
        outcome = await gateway.run(CHAT, LOCAL_KEY, on_text=lambda text: None)
        assert outcome.result.receipt.price_per_gpu_second_micros == advertised
        assert [row.job_id for _, row in gateway.store.rows()] == [outcome.result.job_id]
        assert gateway.store.spent(LOCAL_KEY) == outcome.result.receipt.amount_micros


@pytest.mark.asyncio
async def test_a_worker_advertising_above_the_gpu_second_cap_is_not_sent_the_job(tmp_path):
    worker = _TimeWorker(advertised=CAP + 1, charged=CAP + 1)
    async with gateway_before(worker, tmp_path) as gateway:
        with pytest.raises(ApiError) as caught:
            await gateway.run(CHAT, LOCAL_KEY, on_text=lambda text: None)
    assert (caught.value.status, caught.value.code) == (429, "no_capacity")
    assert f"{CAP + 1} micros per GPU-second, above the cap of {CAP}" in caught.value.message
    assert worker.caps == []
