"""The p2p service reports its own death to the supervisor (a node that can no longer advertise
must not keep running unnoticed), and a clean stop is not a death."""

from __future__ import annotations

import asyncio

import pytest
import trio

from dspark.v1.advert_pb2 import CapacityAdvert, ModelOffer
from node.config import NodeConfig, P2PConfig
from node.events import EventBus
from node.identity import Identity
from node.lifecycle import Supervisor
from node.p2p.host import P2PError
from node.p2p.service import P2PService


def service() -> P2PService:
    config = NodeConfig(p2p=P2PConfig(listen=["/ip4/127.0.0.1/tcp/0"], advert_interval_s=1))
    advert = CapacityAdvert(models=[ModelOffer(id="m", max_context=512)], free_slots=1)
    return P2PService(config, Identity.generate(), EventBus(), capacity=lambda: advert)


async def _crash() -> None:
    raise RuntimeError("boom in the trio nursery")


@pytest.mark.asyncio
async def test_a_dead_libp2p_thread_stops_the_node_with_the_reason():
    p2p = service()
    supervisor = Supervisor([p2p], stop_timeout_s=20)
    run = asyncio.create_task(supervisor.run(on_started=lambda: p2p.network.host._token.run_sync_soon(
        p2p.network.host.spawn, _crash)))
    report = await asyncio.wait_for(run, 60)
    assert not report.ok
    name, reason = report.failed[0]
    assert name == "p2p" and "libp2p host thread died" in reason and "boom" in reason


@pytest.mark.asyncio
async def test_wait_returns_quietly_after_a_clean_stop():
    p2p = service()
    await p2p.start()
    waiter = asyncio.create_task(p2p.network.host.wait())
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await p2p.stop()
    await asyncio.wait_for(waiter, 10)      # returns, does not raise


@pytest.mark.asyncio
async def test_the_listen_addresses_are_logged_at_info_not_as_a_warning(caplog):
    p2p = service()
    caplog.set_level("INFO", logger="node.p2p.service")
    await p2p.start()
    try:
        lines = [r for r in caplog.records if r.getMessage().startswith("p2p listening on")]
        assert lines and all(r.levelname == "INFO" for r in lines)
        assert p2p.identity.peer_id in lines[0].getMessage()          # a full --bootstrap address
    finally:
        await p2p.stop()


@pytest.mark.asyncio
async def test_calls_into_the_host_while_it_stops_end_with_an_error(caplog):
    """A call in flight when the host stopped never returned (its task was cancelled with the host's
    nursery, unanswered), and a call arriving as the nursery closed killed the host thread with a
    traceback, its caller left waiting too: a gateway's requests hung its shutdown."""
    p2p = service()
    await p2p.start()
    host = p2p.network.host

    async def keep_calling() -> None:
        while True:
            await host.call(trio.sleep, 0)

    in_flight = asyncio.create_task(host.call(trio.sleep, 3600))
    callers = [asyncio.create_task(keep_calling()) for _ in range(8)]
    await asyncio.sleep(0.2)
    await p2p.stop()
    for call in (in_flight, *callers):
        with pytest.raises(P2PError):
            await asyncio.wait_for(call, 2)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
