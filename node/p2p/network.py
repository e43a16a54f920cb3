"""One node's view of the peer network, shared by workers (service.py) and clients (discovery.py):
the libp2p host, the validated advert table fed by gossipsub, the advert exchange protocol and DHT
lookups, behind an asyncio API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

import trio
from libp2p.peer.id import ID

from dspark.v1.envelope_pb2 import Envelope
from node.identity import Identity
from node.p2p.adverts import TOPIC, AdvertBook, AdvertRefused, LiveAdvert
from node.p2p.dht import LOOKUP_TIMEOUT_S, find_model_providers
from node.p2p.exchange import fetch_adverts, serve_adverts
from node.p2p.host import HostConfig, P2PError, P2PHost

log = logging.getLogger(__name__)

FETCH_CONCURRENCY = 16     # peers asked for adverts at once (up to 4 MiB of answer each)
# (peer ID of the advertised worker or origin, accepted, reason)
SeenCallback = Callable[[str, bool, str], None]


class PeerNetwork:
    def __init__(self, identity: Identity, config: HostConfig,
                 on_seen: SeenCallback | None = None,
                 extra_setup: Callable[[P2PHost], None] | None = None):
        self.identity = identity
        self.book = AdvertBook(identity.peer_id)
        self._own: Envelope | None = None
        self._on_seen = on_seen               # called on the libp2p thread: must be cheap
        self._extra_setup = extra_setup       # trio side, e.g. start the provider refresher
        self.host = P2PHost(identity, config, on_started=self._setup)
        self.dropped: dict[str, int] = {}     # validator refusals by reason

    async def start(self) -> None:
        await self.host.start()
        host_peer = self.host.host.get_id().to_base58()
        if host_peer != self.identity.peer_id:  # both derive from one key; a mismatch is a bug
            await self.host.stop()
            raise P2PError(f"libp2p peer ID {host_peer} differs from the node identity {self.identity.peer_id}")

    async def stop(self) -> None:
        await self.host.stop()

    # -- trio side --------------------------------------------------------------------------
    async def _setup(self, host: P2PHost) -> None:
        host.pubsub.set_topic_validator(TOPIC, self._validate, False)
        subscription = await host.pubsub.subscribe(TOPIC)
        host.spawn(self._drain, subscription)
        serve_adverts(host, self.book, lambda: self._own)
        if self._extra_setup is not None:
            self._extra_setup(host)

    def _validate(self, forwarder: ID, message) -> bool:
        """Gossipsub topic validator: True delivers and relays the message, False drops it."""
        try:
            origin = ID(message.from_id).to_base58()
        except Exception:  # an unparsable from_id is just another forgery
            origin = ""
        try:
            live = self.book.offer(message.data, origin)
        except AdvertRefused as exc:
            self.dropped[exc.reason] = self.dropped.get(exc.reason, 0) + 1
            # Stale copies are routine (gossip re-delivers adverts a newer one already replaced).
            log.log(logging.DEBUG if exc.reason == "stale" else logging.INFO,
                    "advert from %s dropped (%s): %s", origin, exc.reason, exc)
            self._notify(origin, False, exc.reason)
            return False
        if live.peer_id != self.identity.peer_id:
            self._notify(live.peer_id, True, "")
        return True

    def _notify(self, peer: str, accepted: bool, reason: str) -> None:
        if self._on_seen is not None:
            self._on_seen(peer, accepted, reason)

    async def _drain(self, subscription) -> None:
        # Adverts are stored by the validator; delivery only has to be consumed.
        while True:
            await subscription.get()

    # -- asyncio side -----------------------------------------------------------------------
    async def publish(self, envelope: Envelope) -> int:
        """Publish our signed advert on the topic; returns its size in bytes."""
        self._own = envelope
        data = envelope.SerializeToString()
        await self.host.call(self.host.pubsub.publish, TOPIC, data)
        return len(data)

    def adverts(self, model: str | None = None) -> list[LiveAdvert]:
        return [a for a in self.book.live() if model is None or a.serves(model)]

    async def fetch(self, peer_id: str) -> list[LiveAdvert]:
        """Ask one peer for the adverts it holds; [] if it cannot be reached."""
        try:
            return await self.host.call(fetch_adverts, self.host, self.book, peer_id)
        except (Exception, trio.TooSlowError) as exc:  # unreachable peers are expected
            log.info("fetching adverts from %s failed: %r", peer_id, exc)
            return []

    async def fetch_all(self, peers: list[str]) -> None:
        """Ask several peers at once: one that accepts the stream and never answers costs its own
        timeout, not a turn of every peer after it. At most FETCH_CONCURRENCY at a time, as each
        answer may hold up to exchange.MAX_RESPONSE_BYTES until it is read."""
        slots = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def fetch(peer: str) -> None:
            async with slots:
                await self.fetch(peer)

        await asyncio.gather(*(fetch(peer) for peer in peers))

    async def refresh(self) -> None:
        """Ask every connected peer for its adverts (a client calls this right after joining)."""
        await self.fetch_all(self.host.connected_peers())

    async def providers(self, model: str, timeout_s: float = LOOKUP_TIMEOUT_S) -> list[str]:
        try:
            return await self.host.call(partial(find_model_providers, timeout_s=timeout_s), self.host, model)
        except Exception as exc:  # a DHT lookup failing leaves the gossip view, not an error
            log.info("DHT lookup for %s failed: %s", model, exc)
            return []

    def listen_addrs(self) -> list[str]:
        return self.host.listen_addrs()

    def connected_peers(self) -> list[str]:
        return self.host.connected_peers()
