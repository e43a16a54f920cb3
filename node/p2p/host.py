"""The libp2p host (py-libp2p, trio) in its own thread, bridged to the asyncio side of the node.

Platform notes: Noise only (the library's defaults also offer secio and plaintext), one connection
per peer (otherwise every dial waits ~250 ms), gossipsub heartbeat ~1 s, and the DHT started
*before* any peer is dialled (or identify records peers without the KAD protocol). The asyncio side
awaits `call(fn, *args)`, which runs the trio coroutine `fn(*args)` in the host thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey as P2PPrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from node.identity import Identity

log = logging.getLogger(__name__)
T = TypeVar("T")

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0     # of STOP_TIMEOUT_S, for saying goodbye to the connected peers
BOOTSTRAP_RETRY_S = 2.0     # re-dial bootstrap peers while connected to none of them
# One connection per peer (a second one costs a ~250 ms dial delay per connect), and watermarks
# sized for a market of tens of peers: the library's defaults (50..100) make the auto-connector
# re-dial every known peer, dead ones included, every few seconds.
# py-libp2p drops messages beyond 10 per second per forwarding peer and topic: a relay carrying
# the adverts of 50+ workers (or a burst after a stall) exceeds that and its peers go blind.
# Adverts are bounded by the validator (signed, one live sequence per worker) instead.
MAX_RELAYED_PER_S = 500.0
CONNECTIONS = ConnectionConfig(max_connections_per_peer=1, min_connections=8, low_watermark=16,
                               high_watermark=64, max_connections=128)


class P2PError(RuntimeError):
    """The peer-network side failed (start, dial, or a call into the host thread)."""


@dataclass(frozen=True)
class HostConfig:
    listen: tuple[str, ...]            # multiaddrs; "/ip4/127.0.0.1/tcp/0" picks a free port
    bootstrap: tuple[str, ...] = ()    # full multiaddrs ending in /p2p/<peer id>
    mdns: bool = False
    dht_server: bool = True            # clients that only look things up run the DHT in client mode


def parse_bootstrap(addrs: tuple[str, ...]) -> list[PeerInfo]:
    """Parse bootstrap multiaddrs, refusing any without a /p2p/<peer id> part (we authenticate it)."""
    infos = []
    for text in addrs:
        try:
            infos.append(info_from_p2p_addr(multiaddr.Multiaddr(text)))
        except Exception as exc:  # the multiaddr library raises several unrelated types
            raise P2PError(f"bootstrap address {text!r} is not a multiaddr ending in /p2p/<peer id>: {exc}") from None
    return infos


def route_libp2p_logs() -> None:
    """py-libp2p turns its loggers off unless LIBP2P_DEBUG is set (then it formats them itself),
    which leaves its warnings and errors to logging's last-resort handler: bare lines on stderr, no
    time or logger name, and an ERROR for each redial of a peer that has left (16-20 for every
    departed gateway or `peers` run). They now go through the node's own handler, formatted, and only
    at --log-level DEBUG: the node logs what the network's state means for it (peers, adverts,
    bootstrap) itself."""
    if os.environ.get("LIBP2P_DEBUG"):
        return
    logger = logging.getLogger("libp2p")
    logger.propagate = True
    debugging = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    logger.setLevel(logging.WARNING if debugging else logging.CRITICAL + 1)
    # Some of its modules set their own logger's level (the auto-connector: INFO, two lines every 10 s
    # on a node with fewer than 8 peers, printed at any --log-level): they follow the one above.
    for name, child in logging.root.manager.loggerDict.items():
        if name.startswith("libp2p.") and isinstance(child, logging.Logger):
            child.setLevel(logging.NOTSET)


def _key_pair(identity: Identity) -> KeyPair:
    private = P2PPrivateKey.new(identity.seed)
    return KeyPair(private, private.get_public_key())


class P2PHost:
    """Start/stop a libp2p host with gossipsub + Kademlia; run trio coroutines in its thread."""

    def __init__(self, identity: Identity, config: HostConfig,
                 on_started: Callable[[P2PHost], Awaitable[None]] | None = None):
        self.identity = identity
        self.config = config
        self._on_started = on_started   # trio coroutine run in the host thread before readiness
        self._bootstrap = parse_bootstrap(config.bootstrap)
        self._listen = [multiaddr.Multiaddr(a) for a in config.listen]
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._ended: asyncio.Future[BaseException | None] | None = None   # set when the thread ends
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_event: trio.Event | None = None
        self.host: Any = None
        self.pubsub: Pubsub | None = None
        self.dht: KadDHT | None = None

    # -- asyncio side -----------------------------------------------------------------------
    async def start(self) -> None:
        route_libp2p_logs()
        self._ended = asyncio.get_running_loop().create_future()
        self._thread = threading.Thread(target=self._thread_main, name="libp2p-trio", daemon=True)
        self._thread.start()
        ready = await asyncio.to_thread(self._ready.wait, START_TIMEOUT_S)
        if self._error is not None:
            raise P2PError(f"libp2p host failed to start: {self._error}") from self._error
        if not ready:
            raise P2PError(f"libp2p host did not start within {START_TIMEOUT_S} s")

    async def stop(self) -> None:
        if self._thread is None:
            return
        if self._token is not None and self._stop_event is not None:
            try:
                self._token.run_sync_soon(self._stop_event.set)
            except trio.RunFinishedError:
                pass
        await asyncio.to_thread(self._thread.join, STOP_TIMEOUT_S)
        if self._thread.is_alive():
            raise P2PError(f"libp2p thread still running {STOP_TIMEOUT_S} s after stop")
        self._thread = None

    async def wait(self) -> None:
        """Return when the host thread ends after a stop; raise P2PError if it ends otherwise."""
        error = await asyncio.shield(self._ended)
        if self._stop_event is not None and self._stop_event.is_set():
            return
        raise P2PError(f"libp2p host thread died: {error!r}" if error else "libp2p host thread ended")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run trio coroutine `fn(*args)` in the host thread; cancelling the await cancels it."""
        if not self.running or self._token is None:
            raise P2PError("libp2p host is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def hand_over(result: Any, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):    # the asyncio loop has closed: nobody is waiting
                loop.call_soon_threadsafe(settle, result, error)

        async def runner() -> None:
            # Unless fn returns or raises, the host's nursery was cancelled under it (a stop): the
            # caller must still be answered, or it waits forever.
            result, error = None, P2PError("libp2p host has stopped")
            try:
                with scope:
                    result, error = await fn(*args), None
                if scope.cancelled_caught:
                    error = P2PError("cancelled")
            except Exception as exc:  # handed to the awaiting asyncio task, re-raised there
                error = exc
            finally:
                hand_over(result, error)

        def spawn() -> None:
            # An exception here would kill the whole trio run (and every caller with it).
            try:
                self._nursery.start_soon(runner)
            except RuntimeError:      # the nursery has closed: the host is stopping
                hand_over(None, P2PError("libp2p host has stopped"))

        try:
            self._token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            raise P2PError("libp2p host has stopped") from None
        try:
            return await future
        except asyncio.CancelledError:
            try:
                self._token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass
            raise

    def listen_addrs(self) -> list[str]:
        """Full listen addresses, `/ip4/.../tcp/.../p2p/<peer id>` (what others bootstrap from)."""
        return [str(a) for a in self.host.get_addrs()] if self.host is not None else []

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.host.get_connected_peers()] if self.host is not None else []

    # -- trio side --------------------------------------------------------------------------
    def _thread_main(self) -> None:
        error: BaseException | None = None
        try:
            trio.run(self._trio_main)
        except BaseException as exc:  # reported to start(), logged and to wait(): never silent
            error = exc
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("libp2p host thread died")
        finally:
            self._ready.set()
            loop = self._ended.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(lambda: self._ended.done() or self._ended.set_result(error))

    async def _trio_main(self) -> None:
        key_pair = _key_pair(self.identity)
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self.host = new_host(
            key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise}, muxer_preference="YAMUX",
            listen_addrs=self._listen, enable_mDNS=self.config.mdns,
            connection_config=CONNECTIONS)
        gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID], degree=6, degree_low=4,
            degree_high=12, heartbeat_initial_delay=0.1, heartbeat_interval=1,
            max_messages_per_topic_per_second=MAX_RELAYED_PER_S)
        self.pubsub = Pubsub(self.host, gossipsub)
        # Peers key messages by (origin, seqno) and drop one whose key they saw or validated in the last
        # 120-300 s. py-libp2p counts seqnos from the unix second, so a worker that had published more
        # than once a second and restarted with its key reused recent seqnos: its new adverts were dropped
        # as already seen, or passed on from the validation cache without reaching the advert table,
        # and clients kept its old advert. Nanoseconds, as go-libp2p, keep a restart above its past run.
        self.pubsub.counter = time.time_ns()
        self.dht = KadDHT(self.host, DHTMode.SERVER if self.config.dht_server else DHTMode.CLIENT)
        self._stop_event = trio.Event()
        async with self.host.run(listen_addrs=self._listen), trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            async with background_trio_service(self.pubsub), background_trio_service(gossipsub), \
                    background_trio_service(self.dht):
                await self.pubsub.wait_until_ready()
                stop_watching = self._watch_mdns() if self.config.mdns else None
                nursery.start_soon(self._keep_bootstrapped)
                if self._on_started is not None:
                    await self._on_started(self)
                for addr in self.listen_addrs():
                    log.info("libp2p listening on %s", addr)
                self._ready.set()
                await self._stop_event.wait()
                if stop_watching is not None:
                    stop_watching()
                # Leaving host.run only cancels the swarm's tasks: its sockets stayed open until garbage
                # collection, so peers kept a stopped client listed as connected (a connection slot and a
                # pubsub peer each), and a process that joins per job (submit_via_network) leaked them.
                with trio.move_on_after(CLOSE_TIMEOUT_S):
                    await self.host.close()
                nursery.cancel_scope.cancel()

    async def _dial(self, info: PeerInfo) -> bool:
        # The swarm refuses for 60 s to dial a peer whose addresses all failed: a bootstrap peer down
        # when this node started (or restarting) was not dialled again until then, however soon it was
        # back. Our callers pace their dials themselves.
        self.host.get_network().unblock_peer(info.peer_id)
        try:
            with trio.fail_after(10):
                await self.host.connect(info)
            await self.dht.routing_table.add_peer(info.peer_id)
            return True
        except Exception as exc:  # unreachable peers are normal in a network; report, keep going
            log.info("could not connect to %s: %s", info.peer_id, exc)
            return False

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a background trio task in the host's nursery (trio side; ends with the host)."""
        self._nursery.start_soon(fn, *args)

    async def _keep_bootstrapped(self) -> None:
        """Dial the bootstrap peers until one is connected, and again whenever all of them drop."""
        while self._bootstrap:
            connected = set(self.host.get_connected_peers())
            if not any(info.peer_id in connected for info in self._bootstrap):
                async with trio.open_nursery() as dials:
                    for info in self._bootstrap:
                        dials.start_soon(self._dial, info)
            await trio.sleep(BOOTSTRAP_RETRY_S)

    def _watch_mdns(self) -> Callable[[], None]:
        """mDNS reports peers on a zeroconf thread: hand them to trio and dial them there. Returns
        what stops watching: the library's handlers are process-wide, and one left registered kept
        its stopped host alive for the life of the process."""
        from libp2p.discovery.events.peerDiscovery import peerDiscovery

        token, nursery = self._token, self._nursery

        def dial_soon(info: PeerInfo) -> None:
            # Raising here would kill the trio run.
            with contextlib.suppress(RuntimeError):    # the nursery has closed: the host is stopping
                nursery.start_soon(self._dial, info)

        def discovered(info: PeerInfo) -> None:
            if info.peer_id != self.host.get_id():
                try:
                    token.run_sync_soon(dial_soon, info)
                except trio.RunFinishedError:
                    pass

        peerDiscovery.register_peer_discovered_handler(discovered)
        return lambda: peerDiscovery.unregister_peer_discovered_handler(discovered)
