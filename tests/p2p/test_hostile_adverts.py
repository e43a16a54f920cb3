"""The peer network against hostile or broken peers, on real libp2p hosts (loopback): exchange
responders that stall, floods of adverts from throwaway keys, adverts built to cost the client time
or memory, and askers that never read. The client must still hear of the honest worker, in bounded
time and memory."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import multiaddr
import pytest
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from dspark.v1.advert_pb2 import CapacityAdvert, ModelOffer
from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.p2p_pb2 import AdvertList
from node.envelope import seal
from node.gateway.app import GatewayApp
from node.gateway.config import GatewayConfig
from node.gateway.gateway import Gateway
from node.identity import Identity
from node.p2p import adverts, exchange
from node.p2p import network as network_module
from node.p2p.adverts import AdvertBook
from node.p2p.exchange import FETCH_TIMEOUT_S, MAX_ADVERTS, PROTOCOL
from node.p2p.host import HostConfig
from node.p2p.network import PeerNetwork
from tests.p2p.hostile import (LOOPBACK, honest_advert, joined, relay_holding, relay_serving, signed, silent_endpoint,
                               sybil_advert)
from tests.receipts.receipts_helpers import CLIENT, WORKER


async def _never_answer(stream) -> None:
    await trio.sleep(3600)


async def _stall_exchange(network: PeerNetwork) -> None:
    network.host.host.set_stream_handler(PROTOCOL, _never_answer)


def _peak_rss_mb() -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) / 1024


def _restart_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


@pytest.mark.asyncio
async def test_peers_are_asked_for_adverts_a_bounded_number_at_a_time(monkeypatch):
    """Each answer may hold 4 MiB until read, so a client connected to many peers asks at most
    FETCH_CONCURRENCY of them at once (lowered to 2 here, with six peers that never answer)."""
    monkeypatch.setattr(network_module, "FETCH_CONCURRENCY", 2)
    monkeypatch.setattr(exchange, "FETCH_TIMEOUT_S", 0.5)
    asked_at: list[float] = []

    async def count_and_stall(stream) -> None:
        asked_at.append(time.monotonic())
        await trio.sleep(3600)

    async def install(network: PeerNetwork) -> None:
        network.host.host.set_stream_handler(PROTOCOL, count_and_stall)

    stallers = [PeerNetwork(Identity.generate(), HostConfig(LOOPBACK)) for _ in range(6)]
    await asyncio.gather(*(s.start() for s in stallers))
    await asyncio.gather(*(s.host.call(install, s) for s in stallers))
    client = PeerNetwork(CLIENT, HostConfig(LOOPBACK, tuple(s.listen_addrs()[0] for s in stallers)))
    await client.start()
    try:
        while len(client.connected_peers()) < len(stallers):
            await asyncio.sleep(0.05)
        await client.refresh()
        # Two at a time, the next two once those timed out: waves 0.5 s apart.
        assert len(asked_at) == 6
        assert max(sum(t <= at < t + 0.3 for at in asked_at) for t in asked_at) == 2
    finally:
        await client.stop()
        await asyncio.gather(*(s.stop() for s in stallers))


@pytest.mark.asyncio
async def test_peers_that_stall_the_advert_exchange_cost_one_timeout_together():
    """Three peers accept the exchange stream and never answer; asking every connected peer takes
    one fetch timeout (it took one per stalling peer, in turn), and the honest relay's advert is in.
    The streams given up on are not left open (one more per stalling peer each time it was asked)."""
    stallers = [PeerNetwork(Identity.generate(), HostConfig(LOOPBACK)) for _ in range(3)]
    await asyncio.gather(*(s.start() for s in stallers))
    await asyncio.gather(*(s.host.call(_stall_exchange, s) for s in stallers))
    try:
        async with relay_holding([honest_advert()]) as relay:
            bootstrap = [relay.listen_addrs()[0], *(s.listen_addrs()[0] for s in stallers)]
            async with joined(bootstrap) as discovery:
                while len(discovery.network.connected_peers()) < len(bootstrap):
                    await asyncio.sleep(0.05)
                discovery.network.book = AdvertBook(CLIENT.peer_id)   # forget what start() heard
                started = time.monotonic()
                await asyncio.wait_for(discovery.network.refresh(), FETCH_TIMEOUT_S * 2)
                assert time.monotonic() - started < FETCH_TIMEOUT_S * 1.5
                assert [a.peer_id for a in discovery.adverts("m")] == [WORKER.peer_id]
                swarm = discovery.network.host.host.get_network()
                asked = [stream.get_protocol() for s in stallers
                         for conn in swarm.get_connections(ID.from_base58(s.identity.peer_id))
                         for stream in conn.get_streams()]
                assert PROTOCOL not in asked, asked
    finally:
        await asyncio.gather(*(s.stop() for s in stallers))


@pytest.mark.asyncio
async def test_a_silent_peer_in_the_routing_table_does_not_stretch_the_wait_for_workers():
    """A client's DHT routing table holds a peer that accepts connections and never answers (a departed
    worker's machine dropping packets). Looking up a model nobody serves waited 10 s on it: a wait for
    workers of 1 s took 12. The lookup is cut at the wait."""
    async with silent_endpoint() as silent, relay_holding([]) as relay, joined(relay.listen_addrs()) as discovery:
        host, port = silent.split(":")
        ghost = PeerInfo(ID.from_base58(Identity.generate().peer_id), [multiaddr.Multiaddr(f"/ip4/{host}/tcp/{port}")])

        async def remember_ghost() -> None:
            discovery.network.host.host.get_peerstore().add_addrs(ghost.peer_id, ghost.addrs, 600)
            await discovery.network.host.dht.routing_table.add_peer(ghost, skip_server_mode_check=True)

        await discovery.network.host.call(remember_ghost)
        started = time.monotonic()
        assert await discovery.find_workers("nobody-serves-this", wait_s=1.0) == []
        assert time.monotonic() - started < 3.0


@pytest.mark.asyncio
async def test_a_flood_of_adverts_from_throwaway_keys_does_not_push_out_a_worker_that_keeps_advertising(
        peer_factory, monkeypatch):
    """A peer hands the client batch after batch of valid adverts, each signed by a new key, past the
    book's bound (lowered to 600 peers here, 10,000 in use). The honest worker advertises every second
    and stays listed throughout; the book kept the peers in the order first heard and pushed out the
    honest worker, heard first, as soon as the bound was reached."""
    monkeypatch.setattr(adverts, "MAX_REMEMBERED_PEERS", 600)
    worker = peer_factory("--model", "m", "--interval", "1", "--ttl", "30", "--price", "100000")
    batches = [[sybil_advert("127.0.0.1:1") for _ in range(MAX_ADVERTS)] for _ in range(4)]
    async with relay_serving(batches) as flooder, joined([worker.addr, *flooder.listen_addrs()]) as discovery:
        deadline = time.monotonic() + 10
        while discovery.network.book.get(worker.peer_id) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert discovery.network.book.get(worker.peer_id) is not None
        while batches:
            await asyncio.sleep(1.2)    # an advert interval of the honest worker
            assert len(await discovery.network.fetch(flooder.identity.peer_id)) == MAX_ADVERTS
            listed = {a.peer_id for a in discovery.adverts("m")}
            assert worker.peer_id in listed and len(listed) <= 600


@pytest.mark.asyncio
async def test_an_advert_claiming_an_infinite_speed_does_not_break_the_gateways_model_list(tmp_path):
    """A peer hands a real gateway the honest worker's advert and one with tokens_per_second = inf:
    GET /v1/models answered 500 (JSON has no Infinity) for every user. That advert is dropped as
    malformed; the honest worker is listed."""
    infinite = CapacityAdvert(grpc_endpoint="127.0.0.1:1", models=[ModelOffer(id="m")], free_slots=1,
                              tokens_per_second=float("inf"))
    async with relay_serving([[honest_advert(), signed(infinite)]]) as relay:
        gateway = Gateway(GatewayConfig(bootstrap=relay.listen_addrs(), data_dir=tmp_path, tls="off"), CLIENT)
        try:
            await gateway.start()
            transport = httpx.ASGITransport(GatewayApp(gateway).app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
                response = await http.get("/v1/models")
        finally:
            await gateway.stop()
    assert response.status_code == 200, response.text
    card = json.loads(response.text, parse_constant=lambda c: pytest.fail(f"{c} in the model list"))["data"][0]
    assert card["id"] == "m" and card["dspark"]["workers"] == 1


@pytest.mark.asyncio
async def test_adverts_with_huge_peer_ids_are_refused_without_decoding_them():
    """A peer hands the client 200 validly signed adverts whose peer_id is 15,000 base58 characters:
    each cost ~60 ms of the libp2p thread to decode (12 s for the batch, the host unresponsive
    meanwhile) before it was found not to be a peer ID. Each is now refused on its length."""
    adverts_sent = []
    for _ in range(200):
        advert = CapacityAdvert(peer_id="z" * 15_000, grpc_endpoint="127.0.0.1:1", models=[ModelOffer(id="m")],
                                ttl_seconds=60, issued_at_ms=int(time.time() * 1000))
        adverts_sent.append(seal(Identity.generate(), advert).SerializeToString())
    async with relay_serving([[], adverts_sent]) as relay, joined(relay.listen_addrs()) as discovery:
        started = time.monotonic()
        assert await discovery.network.fetch(relay.identity.peer_id) == []
        assert time.monotonic() - started < 3.0


@pytest.mark.asyncio
async def test_adverts_listing_thousands_of_models_are_refused():
    """A peer hands the client 255 adverts of 3,000 model ids each (16 KiB), 'm' last: every lookup
    of 'm' walked them all (0.6 s per lookup with 1,000 of them). They are refused as malformed."""
    crowded = CapacityAdvert(grpc_endpoint="127.0.0.1:1", free_slots=1,
                             models=[ModelOffer(id=str(i % 10)) for i in range(3000)] + [ModelOffer(id="m")])
    batch = [signed(crowded) for _ in range(MAX_ADVERTS)]
    async with relay_serving([[], batch]) as relay, joined(relay.listen_addrs()) as discovery:
        assert await discovery.network.fetch(relay.identity.peer_id) == []
        assert discovery.adverts("m") == []


@pytest.mark.asyncio
async def test_an_answer_of_millions_of_empty_entries_is_not_parsed_whole():
    """A peer answers the exchange with the honest worker's advert and then 4 MiB of empty entries
    (~2 million): parsed whole, that was ~176 MB per answer. Only the first MAX_ADVERTS entries are
    read, and the honest advert is taken."""
    honest = Envelope.FromString(honest_advert())
    answer = AdvertList(adverts=[honest]).SerializeToString() + b"\x0a\x00" * (2 * 1024 * 1024 - 1024)

    async def handle(stream) -> None:
        await stream.write(answer)
        await stream.close()

    async def install(network: PeerNetwork) -> None:
        network.host.host.set_stream_handler(PROTOCOL, handle)

    relay = PeerNetwork(Identity.generate(), HostConfig(LOOPBACK))
    await relay.start()
    try:
        await relay.host.call(install, relay)
        async with joined(relay.listen_addrs()) as discovery:
            discovery.network.book = AdvertBook(CLIENT.peer_id)   # forget what start() heard
            _restart_peak_rss()
            before = _peak_rss_mb()
            assert [a.peer_id for a in await discovery.network.fetch(relay.identity.peer_id)] == [WORKER.peer_id]
            assert _peak_rss_mb() - before < 60
    finally:
        await relay.stop()


@pytest.mark.asyncio
async def test_peers_that_ask_for_adverts_and_never_read_cannot_make_the_host_hold_an_answer_each():
    """A relay holds 255 near-maximal adverts (a 4 MiB answer). A peer opens 40 exchange streams and
    reads none: the relay held a 4 MiB answer per stream (+250 MB here). It builds at most
    SERVE_CONCURRENCY at a time and closes the others unanswered; an honest asker is answered after."""
    big = CapacityAdvert(grpc_endpoint="127.0.0.1:1", models=[ModelOffer(id=f"{i:03}" + "x" * 200) for i in range(64)])
    held = [signed(big) for _ in range(MAX_ADVERTS - 1)]
    async with relay_holding(held) as relay:
        greedy = PeerNetwork(Identity.generate(), HostConfig(LOOPBACK, (relay.listen_addrs()[0],)))
        await greedy.start()
        streams: list = []

        async def open_streams() -> None:
            target = ID.from_base58(relay.identity.peer_id)
            for _ in range(40):
                streams.append(await greedy.host.host.new_stream(target, [PROTOCOL]))
            await trio.sleep(1.0)   # the relay builds its answers meanwhile

        try:
            while not greedy.connected_peers():
                await asyncio.sleep(0.05)
            _restart_peak_rss()
            before = _peak_rss_mb()
            await greedy.host.call(open_streams)
            assert _peak_rss_mb() - before < 100
        finally:
            await greedy.stop()
        await asyncio.sleep(FETCH_TIMEOUT_S)      # the answers that were being written time out
        asker = PeerNetwork(CLIENT, HostConfig(LOOPBACK, (relay.listen_addrs()[0],)))
        await asker.start()
        try:
            while not asker.connected_peers():
                await asyncio.sleep(0.05)
            assert len(await asker.fetch(relay.identity.peer_id)) == MAX_ADVERTS - 1
        finally:
            await asker.stop()


@pytest.mark.asyncio
async def test_a_relay_holding_more_adverts_than_an_answer_passes_on_the_freshest():
    """A relay holds 300 adverts from throwaway keys, then hears a new honest worker. An answer
    carries 255 relayed adverts: those first heard, so a client joining through it never heard of
    the new worker from it. The freshest are passed on."""
    held = [*(sybil_advert("127.0.0.1:1") for _ in range(300)), honest_advert()]
    async with relay_holding(held) as relay, joined(relay.listen_addrs()) as discovery:
        assert discovery.network.book.get(WORKER.peer_id) is not None
