"""Client-side discovery: join the network through bootstrap peers (or mDNS), and find live workers
for a model from gossiped adverts and DHT provider records."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from node.identity import Identity
from node.p2p.adverts import LiveAdvert
from node.p2p.host import HostConfig, P2PError
from node.p2p.network import PeerNetwork

JOIN_TIMEOUT_S = 10.0
POLL_S = 0.2
PULL_INTERVAL_S = 2.0


class DiscoveryError(RuntimeError):
    """The client could not join the network or found no worker; the message says which."""


class Discovery:
    """A client's short-lived network membership (DHT client mode: it answers no DHT queries)."""

    def __init__(self, identity: Identity, bootstrap: Sequence[str], mdns: bool = False,
                 listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)):
        if not bootstrap and not mdns:
            raise DiscoveryError("no bootstrap peer given (and mDNS off): nothing to join")
        try:
            config = HostConfig(tuple(listen), tuple(bootstrap), mdns, dht_server=False)
            self.network = PeerNetwork(identity, config)
        except P2PError as exc:
            raise DiscoveryError(str(exc)) from None

    async def start(self, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Start the host, wait for a first peer, then ask the connected peers for their adverts."""
        try:
            await self.network.start()
        except P2PError as exc:
            raise DiscoveryError(str(exc)) from None
        deadline = time.monotonic() + timeout_s
        while not self.network.connected_peers():
            if time.monotonic() > deadline:
                await self.network.stop()
                raise DiscoveryError(f"could not reach any bootstrap peer within {timeout_s:g} s")
            await asyncio.sleep(POLL_S)
        await self.network.refresh()

    async def stop(self) -> None:
        await self.network.stop()

    async def __aenter__(self) -> Discovery:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def adverts(self, model: str | None = None) -> list[LiveAdvert]:
        return self.network.adverts(model)

    async def find_workers(self, model: str, wait_s: float = 3.0) -> list[LiveAdvert]:
        """Live adverts of workers serving `model`. When none is known yet, asks the DHT for
        providers and fetches their adverts directly, waiting up to `wait_s` for a first one."""
        deadline = time.monotonic() + wait_s
        while not self.adverts(model) and (left := deadline - time.monotonic()) > 0:
            # Cut at the caller's wait: a lookup waits 10 s on each silent peer of the routing table
            # (a departed worker's machine that drops packets), and a wait of 1 s took 12.
            await self.network.fetch_all(await self.network.providers(model, timeout_s=left))
            if not self.adverts(model):
                await asyncio.sleep(POLL_S)
                await self.network.refresh()
        return self.adverts(model)

    async def wait_for(self, count: int, model: str | None = None, timeout_s: float = 10.0) -> list[LiveAdvert]:
        """Wait until at least `count` workers (serving `model`, if given) are visible."""
        deadline = time.monotonic() + timeout_s
        pulled = time.monotonic()
        while len(found := self.adverts(model)) < count and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            if time.monotonic() - pulled >= PULL_INTERVAL_S:  # gossip may lag; also ask our peers
                await self.network.refresh()
                pulled = time.monotonic()
        return found
