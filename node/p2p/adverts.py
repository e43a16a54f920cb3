"""Signed capacity adverts: building them, checking received ones, and the table of live ones.

An advert travels as an `Envelope(CapacityAdvert)` signed by the worker's node key. A receiver
drops it before delivery (gossipsub topic validator) when it is oversized, unsigned or badly
signed, forged (signing key != the advert's peer ID, or the advert arrives from another origin
than the peer it describes), stale (sequence not above the last one seen from that peer), expired
(issued_at + ttl in the past) or issued too far in the future.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from google.protobuf.message import DecodeError

from dspark.v1.advert_pb2 import CapacityAdvert
from dspark.v1.envelope_pb2 import Envelope
from node.config import split_host_port
from node.envelope import EnvelopeError, open_envelope, quoted, seal
from node.identity import Identity, IdentityError, public_key_from_peer_id

TOPIC = "/dspark/capacity/1"
MAX_ADVERT_BYTES = 16 * 1024     # a real advert is ~400 bytes; 16 KiB leaves room for many models
MAX_TTL_S = 86_400             # same bound as the node config (p2p.advert_ttl_s)
MAX_CLOCK_SKEW_MS = 30_000
# A worker serves one model (capacity.py); 16 KiB held ~3,000 tiny ones, and every client's lookup of
# a model walks each advert's list: 1,000 such adverts made one lookup take 0.6 s.
MAX_MODELS_PER_ADVERT = 64
MAX_REMEMBERED_PEERS = 10_000    # bound on the sequence memory (replay protection)
# Bound on the live adverts' serialized bytes: without it a flood of 16 KiB adverts signed by
# throwaway keys held ~0.5 GB (10,000 peers at ~47 KB of memory each, measured).
MAX_LIVE_BYTES = 16 * 1024 * 1024


def now_ms() -> int:
    return int(time.time() * 1000)


class AdvertRefused(ValueError):
    """An advert that must be dropped; `reason` is a short tag (AdvertSeen.reason)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_advert(data: bytes, origin_peer_id: str | None, at_ms: int, known_sequences: Mapping[str, int],
                 max_skew_ms: int = MAX_CLOCK_SKEW_MS) -> tuple[Envelope, CapacityAdvert]:
    """Parse and verify one received advert (pure: no state, no I/O); raise AdvertRefused.

    `origin_peer_id` is the gossipsub origin (`from_id`), which must be the advertised peer;
    None for an advert relayed by request (exchange.py), where only the signature binds it."""
    if len(data) > MAX_ADVERT_BYTES:
        raise AdvertRefused("oversized", f"advert of {len(data)} bytes exceeds {MAX_ADVERT_BYTES}")
    envelope = Envelope()
    try:
        envelope.ParseFromString(data)
    except DecodeError:
        raise AdvertRefused("malformed", "advert is not a serialized Envelope") from None
    if not envelope.signature:
        raise AdvertRefused("unsigned", "advert envelope carries no signature")
    try:
        advert = open_envelope(envelope, CapacityAdvert)
    except EnvelopeError as exc:
        raise AdvertRefused(exc.reason, f"advert envelope refused: {exc}") from None
    try:
        claimed_key = public_key_from_peer_id(advert.peer_id)
    except IdentityError as exc:
        raise AdvertRefused("malformed", f"advert peer_id: {exc}") from None
    if claimed_key != envelope.public_key:
        raise AdvertRefused("forged", f"advert for {advert.peer_id} is signed by another key")
    if origin_peer_id is not None and origin_peer_id != advert.peer_id:
        raise AdvertRefused("forged", f"advert for {advert.peer_id} published by {origin_peer_id}")
    if not 1 <= advert.ttl_seconds <= MAX_TTL_S:
        raise AdvertRefused("malformed", f"ttl_seconds {advert.ttl_seconds} outside [1, {MAX_TTL_S}]")
    if advert.issued_at_ms > at_ms + max_skew_ms:
        raise AdvertRefused("future", f"advert issued {advert.issued_at_ms - at_ms} ms in the future")
    if advert.issued_at_ms + advert.ttl_seconds * 1000 <= at_ms:
        raise AdvertRefused("expired", f"advert from {advert.peer_id} expired")
    last_sequence = known_sequences.get(advert.peer_id)
    if last_sequence is not None and advert.sequence <= last_sequence:
        raise AdvertRefused("stale", f"sequence {advert.sequence} is not above {last_sequence} seen before")
    if len(advert.models) > MAX_MODELS_PER_ADVERT:
        raise AdvertRefused("malformed", f"advert lists {len(advert.models)} models, more than {MAX_MODELS_PER_ADVERT}")
    # A rate clients rank by and show: inf made the gateway's GET /v1/models a 500 (JSON has no
    # Infinity) and `peers --json` print a line that is not JSON.
    if not (math.isfinite(advert.tokens_per_second) and advert.tokens_per_second >= 0):
        raise AdvertRefused("malformed", f"tokens_per_second {advert.tokens_per_second} is not a finite rate >= 0")
    try:
        _, port = split_host_port(advert.grpc_endpoint)
    except ValueError as exc:
        raise AdvertRefused("malformed", f"grpc_endpoint {exc}") from None
    if port == 0:
        raise AdvertRefused("malformed", f"grpc_endpoint {quoted(advert.grpc_endpoint)} has port 0")
    return envelope, advert


@dataclass(frozen=True)
class LiveAdvert:
    advert: CapacityAdvert
    envelope: Envelope
    expires_at_ms: int

    @property
    def peer_id(self) -> str:
        return self.advert.peer_id

    @cached_property
    def model_ids(self) -> frozenset[str]:
        return frozenset(offer.id for offer in self.advert.models)

    def serves(self, model: str) -> bool:
        return model in self.model_ids


class AdvertBook:
    """Live adverts by peer, plus the last sequence seen per peer (kept past expiry, so an old
    advert replayed after its sender went quiet is still refused). Both are bounded; when full,
    the peer that advertised least recently is forgotten first: a worker re-advertises every few
    seconds, so a flood of adverts from throwaway keys must outpace that across the whole table to
    push it out. Thread-safe: the libp2p thread writes, the asyncio side reads."""

    def __init__(self, self_peer_id: str = ""):
        self._self = self_peer_id
        self._lock = threading.Lock()
        # Both in the order peers last advertised, least recent first.
        self._live: OrderedDict[str, LiveAdvert] = OrderedDict()
        self._live_bytes = 0
        self._last_sequence: OrderedDict[str, int] = OrderedDict()

    def offer(self, data: bytes, origin_peer_id: str | None, at_ms: int | None = None) -> LiveAdvert:
        """Check and store an advert; raise AdvertRefused. Our own adverts are checked, not stored."""
        at = now_ms() if at_ms is None else at_ms
        with self._lock:
            envelope, advert = check_advert(data, origin_peer_id, at, self._last_sequence)
            # The receiver's clock bounds the lifetime too: a worker whose clock runs ahead must
            # not stay listed longer than its TTL.
            live = LiveAdvert(advert, envelope, min(advert.issued_at_ms, at) + advert.ttl_seconds * 1000)
            if advert.peer_id == self._self:
                return live
            self._last_sequence.pop(advert.peer_id, None)
            self._last_sequence[advert.peer_id] = advert.sequence
            while len(self._last_sequence) > MAX_REMEMBERED_PEERS:
                self._drop_live(self._last_sequence.popitem(last=False)[0])
            self._drop_live(advert.peer_id)
            self._live[advert.peer_id] = live
            self._live_bytes += envelope.ByteSize()
            while self._live_bytes > MAX_LIVE_BYTES:
                self._drop_live(next(iter(self._live)))
            return live

    def _drop_live(self, peer_id: str) -> None:
        dropped = self._live.pop(peer_id, None)
        if dropped is not None:
            self._live_bytes -= dropped.envelope.ByteSize()

    def live(self, at_ms: int | None = None) -> list[LiveAdvert]:
        """The unexpired adverts, the peer that advertised least recently first."""
        at = now_ms() if at_ms is None else at_ms
        with self._lock:
            for peer in [p for p, a in self._live.items() if a.expires_at_ms <= at]:
                self._drop_live(peer)
            return list(self._live.values())

    def get(self, peer_id: str, at_ms: int | None = None) -> LiveAdvert | None:
        return next((a for a in self.live(at_ms) if a.peer_id == peer_id), None)


class AdvertSigner:
    """Stamps and signs this node's adverts with a strictly increasing sequence. The sequence
    starts at the current unix ms, so a restarted worker's adverts still outrank its old ones, and
    is at least the sequence the capacity advert came with: Worker.GetCapacity hands out adverts of
    the node's capacity tracker (node/capacity.py), whose sequence a burst of calls pushes past the
    clock, and a client that keeps both kinds must not take the next published one for stale."""

    def __init__(self, identity: Identity, ttl_seconds: int):
        if not 1 <= ttl_seconds <= MAX_TTL_S:
            raise ValueError(f"advert ttl {ttl_seconds} s outside [1, {MAX_TTL_S}]")
        self.identity = identity
        self.ttl_seconds = ttl_seconds
        self._sequence = 0

    @property
    def last_sequence(self) -> int:
        return self._sequence

    def sign(self, capacity: CapacityAdvert, listen_addrs: list[str]) -> Envelope:
        advert = CapacityAdvert()
        advert.CopyFrom(capacity)
        at = now_ms()
        self._sequence = max(self._sequence + 1, at, capacity.sequence)
        advert.peer_id = self.identity.peer_id
        del advert.listen_addrs[:]
        advert.listen_addrs.extend(listen_addrs)
        advert.sequence = self._sequence
        advert.ttl_seconds = self.ttl_seconds
        advert.issued_at_ms = at
        return seal(self.identity, advert)
