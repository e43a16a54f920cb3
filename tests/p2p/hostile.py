"""Hostile or broken peers on real libp2p hosts (loopback), shared by test_hostile_adverts.py (the
peer network: adverts and their exchange) and test_hostile_workers.py (choosing and paying a worker)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from dspark.v1 import job_pb2, worker_pb2, worker_pb2_grpc
from dspark.v1.advert_pb2 import CapacityAdvert, ModelOffer
from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.p2p_pb2 import AdvertList
from node.envelope import seal
from node.identity import Identity
from node.p2p.adverts import AdvertSigner
from node.p2p.discovery import Discovery
from node.p2p.exchange import PROTOCOL
from node.p2p.host import HostConfig
from node.p2p.network import PeerNetwork
from tests.gateway.test_gateway_price_caps import _TimeWorker
from tests.receipts.receipts_helpers import CLIENT, WORKER

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


def signed(advert: CapacityAdvert, identity: Identity | None = None) -> bytes:
    """The advert as peers pass it on, signed for 60 s by `identity` (a throwaway key by default)."""
    return AdvertSigner(identity or Identity.generate(), 60).sign(advert, []).SerializeToString()


def sybil_advert(endpoint: str, model: str = "m") -> bytes:
    """A throwaway key's advert for `model`, cheaper than any honest worker, with free slots."""
    return signed(CapacityAdvert(grpc_endpoint=endpoint, models=[ModelOffer(id=model)], price_per_mtok_micros=1,
                                 free_slots=8, tokens_per_second=1e9))


def honest_advert() -> bytes:
    """WORKER's advert for "m", at an endpoint the tests using it never dial."""
    worker = _TimeWorker(0, 0)
    worker.endpoint = "127.0.0.1:7440"
    return signed(worker.advert(), WORKER)


@contextlib.asynccontextmanager
async def serving(worker):
    """`worker` (a Worker servicer with an `endpoint`) on a real loopback socket."""
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    worker.endpoint = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        yield worker
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def honest_worker() -> AsyncIterator[_TimeWorker]:
    """A gRPC worker on a real socket, signed by WORKER, that completes every job at its price."""
    async with serving(_TimeWorker(advertised=0, charged=0)) as worker:
        yield worker


@contextlib.asynccontextmanager
async def silent_endpoint() -> AsyncIterator[str]:
    """A TCP endpoint that accepts connections and never says a word (as one whose packets are
    dropped does, for the whole probe timeout)."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


class SilentWorker(worker_pb2_grpc.WorkerServicer):
    """Takes a job (sends `accepted`) and then nothing, its connection open and its pings answered:
    a buggy or malicious worker. The cheapest advert on the network, under a key of its own."""

    def __init__(self) -> None:
        self.identity = Identity.generate()
        self.endpoint = ""
        self.holding = 0                        # jobs it holds now
        self.abandoned = asyncio.Event()        # a client ended a job's call (cancelled it)

    def advert(self) -> CapacityAdvert:
        return CapacityAdvert(peer_id=self.identity.peer_id, grpc_endpoint=self.endpoint,
                              models=[ModelOffer(id="m")], price_per_mtok_micros=1, free_slots=8)

    async def GetCapacity(self, request, context):
        return seal(self.identity, self.advert())

    async def Submit(self, job, context):
        yield job_pb2.SubmitEvent(accepted=job_pb2.JobAccepted(worker_peer_id=self.identity.peer_id))
        self.holding += 1
        try:
            await asyncio.Event().wait()
        finally:
            self.holding -= 1
            self.abandoned.set()

    async def Cancel(self, request, context):
        return worker_pb2.CancelResponse(cancelled=True)


@contextlib.asynccontextmanager
async def silent_worker() -> AsyncIterator[SilentWorker]:
    """A SilentWorker on a real socket."""
    async with serving(SilentWorker()) as worker:
        yield worker


@contextlib.asynccontextmanager
async def relay_holding(adverts: list[bytes]) -> AsyncIterator[PeerNetwork]:
    """A real peer holding `adverts` (relayed ones, accepted on their signatures), as any node on the
    network would after hearing them."""
    relay = PeerNetwork(Identity.generate(), HostConfig(LOOPBACK))
    await relay.start()
    for data in adverts:
        relay.book.offer(data, origin_peer_id=None)
    try:
        yield relay
    finally:
        await relay.stop()


async def _serve_batches(network: PeerNetwork, batches: list[list[bytes]]) -> None:
    """Each exchange request is answered with the next batch of adverts."""

    async def handle(stream) -> None:
        batch = batches.pop(0) if batches else []
        await stream.write(AdvertList(adverts=[Envelope.FromString(a) for a in batch]).SerializeToString())
        await stream.close()

    network.host.host.set_stream_handler(PROTOCOL, handle)


@contextlib.asynccontextmanager
async def relay_serving(batches: list[list[bytes]]) -> AsyncIterator[PeerNetwork]:
    """A real peer answering each advert exchange with the next of `batches`, checks or none (a
    client that joins asks once at start: the first batch is for that)."""
    relay = PeerNetwork(Identity.generate(), HostConfig(LOOPBACK))
    await relay.start()
    try:
        await relay.host.call(_serve_batches, relay, batches)
        yield relay
    finally:
        await relay.stop()


@contextlib.asynccontextmanager
async def joined(bootstrap: list[str]) -> AsyncIterator[Discovery]:
    """The client (CLIENT) on the network through `bootstrap`, as `submit` joins it."""
    discovery = Discovery(CLIENT, bootstrap)
    try:
        await discovery.start()
        yield discovery
    finally:
        await discovery.stop()
