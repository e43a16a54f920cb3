"""Kademlia provider records for the models a worker serves.

Key: the CIDv1 (raw codec, sha256 multihash) of the name `dspark/model/<model-id>`, printed in
base32 (`bafkrei...`). Other libp2p implementations key provider records by the CID's multihash,
so they find our workers too (platform notes, interoperability). Functions marked "trio side" run
in the host thread (via `P2PHost.call` / `spawn`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable

import trio
from libp2p.bitswap.cid import parse_cid

from node.p2p.host import P2PHost

log = logging.getLogger(__name__)

_CID_V1 = 0x01
_CODEC_RAW = 0x55
_MULTIHASH_SHA2_256 = 0x12
# Providers are stored for 48 h by remote peers (py-libp2p, go-libp2p); we re-provide far sooner,
# and also as soon as the routing table grows, so peers that join later get the records.
REPROVIDE_INTERVAL_S = 600.0
CHECK_INTERVAL_S = 2.0
LOOKUP_TIMEOUT_S = 12.0   # above py-libp2p's 10 s per-peer query timeout: one silent peer must not end it
PROVIDE_TIMEOUT_S = 30.0


def model_key_name(model_id: str) -> str:
    return f"dspark/model/{model_id}"


def model_cid(model_id: str) -> str:
    """CIDv1 (raw, sha256) of `dspark/model/<model-id>`, multibase base32 lower-case ('b...')."""
    digest = hashlib.sha256(model_key_name(model_id).encode()).digest()
    raw = bytes([_CID_V1, _CODEC_RAW, _MULTIHASH_SHA2_256, len(digest)]) + digest
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


async def _tell(host: P2PHost, peer, key: bytes) -> None:
    with trio.move_on_after(LOOKUP_TIMEOUT_S):
        try:
            # py-libp2p 0.8.1's one-peer ADD_PROVIDER (a pinned version; no public equivalent).
            await host.dht.provider_store._send_add_provider(peer, key)
        except Exception as exc:  # that peer misses this round; the next refresh retries
            log.debug("ADD_PROVIDER to %s failed: %s", peer, exc)


async def provide_models(host: P2PHost, models: list[str]) -> int:
    """Trio side: announce this peer as a provider of each model; returns how many succeeded.

    The peers already in the routing table get the record at once; then the library's `provide`
    looks up the k closest peers network-wide, which can take tens of seconds on py-libp2p
    (10 s per silent peer), so it is bounded."""
    done = 0
    for model in models:
        cid = model_cid(model)
        key = parse_cid(cid).multihash
        async with trio.open_nursery() as nursery:
            for peer in host.dht.routing_table.get_peer_ids():
                nursery.start_soon(_tell, host, peer, key)
        try:
            with trio.move_on_after(PROVIDE_TIMEOUT_S):
                await host.dht.provide(cid)
            done += 1
        except Exception as exc:  # one unreachable DHT peer must not stop the other records
            log.warning("providing %s failed: %s", model, exc)
    return done


async def keep_providing(host: P2PHost, models: Callable[[], list[str]],
                         interval_s: float = REPROVIDE_INTERVAL_S) -> None:
    """Trio side, runs for the host's life: re-provide every `interval_s`, and whenever the routing
    table has grown or the model list changed since the last time."""
    last_size, last_models, last_at = -1, [], -float("inf")
    while True:
        size, current = host.dht.get_routing_table_size(), sorted(models())
        due = trio.current_time() - last_at >= interval_s
        if size > 0 and current and (due or size > last_size or current != last_models):
            provided = await provide_models(host, current)
            log.debug("provided %d/%d model records to a routing table of %d", provided, len(current), size)
            last_size, last_models, last_at = size, current, trio.current_time()
        await trio.sleep(CHECK_INTERVAL_S)


async def find_model_providers(host: P2PHost, model: str, count: int = 20,
                               timeout_s: float = LOOKUP_TIMEOUT_S) -> list[str]:
    """Trio side: peer IDs providing `model`, deduplicated (the library may return one twice),
    addresses added to the peerstore so the peer can be dialled. A lookup still running after
    `timeout_s` returns what it has found so far (py-libp2p waits 10 s on each silent peer)."""
    cid = model_cid(model)
    infos = []
    with trio.move_on_after(timeout_s):
        infos = await host.dht.find_providers(cid, count)
    if not infos:  # cut short: providers heard from so far are in the local provider store
        infos = host.dht.provider_store.get_providers(parse_cid(cid).multihash)
    seen: dict[str, object] = {}
    for info in infos:
        peer = info.peer_id.to_base58()
        if peer not in seen and info.peer_id != host.host.get_id():
            seen[peer] = info
            if info.addrs:
                host.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 600)
    return list(seen)
