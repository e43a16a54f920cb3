"""The gateway against a worker that takes each job and then sends nothing, its connection alive: the
cheapest on a real peer network (loopback libp2p), beside an honest gRPC worker. The gateway held
each request for its timeout_s (600 s) there; now it moves on after idle_timeout_s."""

from __future__ import annotations

import asyncio
import time

import pytest

from node.gateway.config import GatewayConfig
from node.gateway.gateway import Gateway
from node.gateway.receipt_store import LOCAL_KEY
from tests.gateway.test_gateway_price_caps import CHAT
from tests.p2p.hostile import honest_worker, relay_holding, signed, silent_worker
from tests.receipts.receipts_helpers import CLIENT, WORKER

IDLE_TIMEOUT_S = 5.5        # the least the gateway takes: just above a worker's heartbeat (5 s)


@pytest.mark.asyncio
async def test_the_gateway_gives_up_on_a_silent_worker_after_its_idle_timeout(tmp_path):
    async with silent_worker() as silent, honest_worker() as worker:
        adverts = [signed(silent.advert(), silent.identity), signed(worker.advert(), WORKER)]
        async with relay_holding(adverts) as relay:
            gateway = Gateway(GatewayConfig(bootstrap=relay.listen_addrs(), data_dir=tmp_path, tls="off",
                                            idle_timeout_s=IDLE_TIMEOUT_S), CLIENT)
            await gateway.start()
            try:
                await gateway.discovery.wait_for(2, "m")
                started = time.monotonic()
                first = await gateway.run(CHAT, LOCAL_KEY, on_text=lambda text: None)
                elapsed = time.monotonic() - started
                await asyncio.wait_for(silent.abandoned.wait(), 5)
                # Demoted for having gone silent: the next request goes to the honest worker at once.
                second = await gateway.run(CHAT, LOCAL_KEY, on_text=lambda text: None)
            finally:
                await gateway.stop()
    assert [(a.peer_id, a.outcome) for a in first.attempts] == [(silent.identity.peer_id, "silent"),
                                                               (WORKER.peer_id, "completed")]
    assert IDLE_TIMEOUT_S <= elapsed < IDLE_TIMEOUT_S + 5 and silent.holding == 0
    assert [(a.peer_id, a.outcome) for a in second.attempts] == [(WORKER.peer_id, "completed")]
