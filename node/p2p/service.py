"""P2PService: the daemon's peer-network service. It runs the libp2p host, publishes this node's
signed capacity advert every `p2p.advert_interval_s` and whenever free slots / queue / models /
price change, keeps DHT provider records for its models, and reports PeerChange, AdvertPublished
and AdvertSeen on the event bus."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from dspark.v1.advert_pb2 import CapacityAdvert
from node.capacity import mark_draining
from node.config import NodeConfig
from node.events import AdvertPublished, AdvertSeen, EventBus, PeerChange
from node.identity import Identity
from node.p2p.adverts import AdvertSigner
from node.p2p.dht import keep_providing
from node.p2p.host import HostConfig, P2PError, P2PHost
from node.p2p.network import PeerNetwork

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.5     # how often capacity is sampled for changes (and the publish rate cap)
PEER_POLL_S = 1.0
LEAVING_PUBLISH_S = 2.0    # the most a stop waits to publish the last (draining) advert
# Publishing returns before the message has left the host, and stopping the host closes its
# connections: a draining advert published just before the stop never reached a connected client.
LEAVING_LINGER_S = 0.5


def _fingerprint(advert: CapacityAdvert) -> tuple:
    """What makes an advert worth republishing before its interval is up."""
    return (advert.free_slots, advert.queue_depth, advert.price_per_mtok_micros, advert.grpc_endpoint,
            tuple((m.id, m.digest, m.drafter) for m in advert.models), advert.draining)


class P2PService:
    name = "p2p"

    def __init__(self, config: NodeConfig, identity: Identity, events: EventBus,
                 capacity: Callable[[], CapacityAdvert]):
        self.config = config
        self.identity = identity
        self.events = events
        self.capacity = capacity
        self.network: PeerNetwork | None = None
        self._signer = AdvertSigner(identity, config.p2p.advert_ttl_s)
        self._models: list[str] = []          # read by the DHT refresher on the libp2p thread
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        p2p = self.config.p2p
        self._loop = asyncio.get_running_loop()
        self.network = PeerNetwork(
            self.identity, HostConfig(tuple(p2p.listen), tuple(p2p.bootstrap), p2p.mdns, dht_server=True),
            on_seen=self._seen, extra_setup=self._start_providing)
        await self.network.start()
        for addr in self.network.listen_addrs():
            # The daemon's ready line carries these too, for the default (WARNING) log level.
            log.info("p2p listening on %s (use as --bootstrap for other nodes)", addr)
        last = await self._publish(self._advert())
        self._tasks = [asyncio.create_task(self._publish_loop(last), name="p2p-adverts"),
                       asyncio.create_task(self._watch_peers(), name="p2p-peers")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._tasks:
            await self._say_leaving()
        self._tasks = []
        if self.network is not None:
            await self.network.stop()

    async def _say_leaving(self) -> None:
        """The node is stopping (this service stops first, the running jobs' drain comes next): a
        last advert says so, and clients stop choosing it now rather than when its last advert
        expires (p2p.advert_ttl_s), meanwhile sending it jobs it would refuse as shutting_down."""
        advert = mark_draining(self._advert())
        try:
            async with asyncio.timeout(LEAVING_PUBLISH_S):
                await self._publish(advert)
            await asyncio.sleep(LEAVING_LINGER_S)
        except Exception as exc:    # a node that cannot say it leaves still stops
            log.warning("could not publish the draining advert: %s", exc)

    async def wait(self) -> None:
        """For the supervisor: raises when the libp2p thread or an advertising task dies (the node
        would otherwise keep serving while invisible to the market)."""
        host = asyncio.create_task(self.network.host.wait())
        try:
            done, _ = await asyncio.wait([host, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            host.cancel()
        for task in done:
            task.result()                       # re-raises what ended it
            if task is not host:
                raise P2PError(f"{task.get_name()} ended")

    def _start_providing(self, host: P2PHost) -> None:
        host.spawn(keep_providing, host, lambda: self._models)

    def _advert(self) -> CapacityAdvert:
        advert = self.capacity()
        if self.config.p2p.announce_grpc:
            advert.grpc_endpoint = self.config.p2p.announce_grpc
        elif not advert.grpc_endpoint:
            advert.grpc_endpoint = self.config.grpc_listen
        return advert

    async def _publish(self, advert: CapacityAdvert) -> tuple:
        self._models = [m.id for m in advert.models]
        envelope = self._signer.sign(advert, self.network.listen_addrs())
        size = await self.network.publish(envelope)
        self.events.publish(AdvertPublished(sequence=self._signer.last_sequence, free_slots=advert.free_slots,
                                            queue_depth=advert.queue_depth, size_bytes=size))
        return _fingerprint(advert)

    async def _publish_loop(self, last: tuple) -> None:
        interval = self.config.p2p.advert_interval_s
        published_at, peers_then = time.monotonic(), len(self.network.connected_peers())
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            try:
                advert = self._advert()
                # A new peer also triggers a publish: an advert sent before any mesh existed (at
                # start) reached nobody, and waiting a full interval would hide this worker.
                peers_now = len(self.network.connected_peers())
                if (_fingerprint(advert) != last or peers_now > peers_then
                        or time.monotonic() - published_at >= interval):
                    last = await self._publish(advert)
                    published_at = time.monotonic()
                peers_then = peers_now
            except Exception:  # a failed round must not end advertising; the next one retries
                log.exception("publishing the capacity advert failed")

    async def _watch_peers(self) -> None:
        count = -1
        while True:
            now = len(self.network.connected_peers())
            if now != count:
                count = now
                self.events.publish(PeerChange(connected_peers=now))
            await asyncio.sleep(PEER_POLL_S)

    def _seen(self, peer_id: str, accepted: bool, reason: str) -> None:
        # Called on the libp2p thread; bus subscribers live on the asyncio loop.
        event = AdvertSeen(peer_id=peer_id, accepted=accepted, reason=reason)
        try:
            self._loop.call_soon_threadsafe(self.events.publish, event)
        except RuntimeError:  # loop closed during shutdown
            pass
