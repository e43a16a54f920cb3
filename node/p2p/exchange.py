"""Stream protocol /dspark/adverts/1: ask a peer for the live adverts it holds.

The responder writes one `AdvertList` (its own advert first, then those it has heard) and closes.
A newly joined client asks its bootstrap peers and any DHT provider instead of waiting a full advert
interval for gossip. Every advert is still checked with `AdvertBook.offer` against the key of the
worker it describes, so a relay can withhold or delay adverts but never forge one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from dspark.v1.envelope_pb2 import Envelope
from dspark.v1.p2p_pb2 import AdvertList
from node.p2p.adverts import MAX_ADVERT_BYTES, AdvertBook, AdvertRefused, LiveAdvert
from node.p2p.host import P2PHost

log = logging.getLogger(__name__)

PROTOCOL = TProtocol("/dspark/adverts/1")
MAX_ADVERTS = 256
MAX_RESPONSE_BYTES = MAX_ADVERTS * (MAX_ADVERT_BYTES + 16)
FETCH_TIMEOUT_S = 5.0
RESET_TIMEOUT_S = 1.0
SERVE_CONCURRENCY = 8


_ADVERTS_FIELD = 1                   # AdvertList.adverts
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5    # protobuf wire types


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if at >= len(data):
            raise ValueError("truncated")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
    raise ValueError("a varint longer than 10 bytes")


def advert_entries(data: bytes) -> list[bytes]:
    """The serialized envelopes of an AdvertList, at most MAX_ADVERTS, read from its wire framing:
    parsed whole, 4 MiB of empty entries made ~2 million messages (176 MB, 0.1 s on the libp2p
    thread, per answer). Fields a later version may add are skipped."""
    entries, at = [], 0
    while at < len(data) and len(entries) < MAX_ADVERTS:
        key, at = _varint(data, at)
        wire_type = key & 7
        if wire_type == _VARINT:
            _, at = _varint(data, at)
            continue
        if wire_type in (_FIXED64, _FIXED32):
            at += 8 if wire_type == _FIXED64 else 4
            continue
        if wire_type != _BYTES:
            raise ValueError(f"wire type {wire_type}")
        size, at = _varint(data, at)
        if at + size > len(data):
            raise ValueError("truncated")
        if key >> 3 == _ADVERTS_FIELD:
            entries.append(data[at:at + size])
        at += size
    if at > len(data):
        raise ValueError("truncated")
    return entries


def serve_adverts(host: P2PHost, book: AdvertBook, own: Callable[[], Envelope | None]) -> None:
    """Trio side: register the responder on the host. An answer (up to MAX_RESPONSE_BYTES) is held
    until the asker reads it: at most SERVE_CONCURRENCY are built at once, each for at most
    FETCH_TIMEOUT_S, and a stream asked beyond that is closed unanswered (the asker still has gossip).
    Unbounded, peers that opened streams and never read made the host hold 4 MiB per stream."""
    answering = trio.CapacityLimiter(SERVE_CONCURRENCY)

    async def handle(stream) -> None:
        try:
            answering.acquire_nowait()
        except trio.WouldBlock:
            await stream.close()
            return
        try:
            response = AdvertList()
            mine = own()
            if mine is not None:
                response.adverts.append(mine)
            # The freshest: a worker that joined after hundreds of others (or of a flood's adverts)
            # is still passed on, and the quiet ones are the likeliest gone.
            response.adverts.extend(a.envelope for a in book.live()[-(MAX_ADVERTS - 1):])
            with trio.move_on_after(FETCH_TIMEOUT_S):
                await stream.write(response.SerializeToString())
        except Exception as exc:  # a peer that hangs up early is not our failure
            log.debug("serving adverts failed: %s", exc)
        finally:
            answering.release()
            await stream.close()

    host.host.set_stream_handler(PROTOCOL, handle)


async def fetch_adverts(host: P2PHost, book: AdvertBook, peer_id: str) -> list[LiveAdvert]:
    """Trio side: ask `peer_id` for its adverts; store the valid new ones and return them."""
    with trio.fail_after(FETCH_TIMEOUT_S):
        stream = await host.host.new_stream(ID.from_base58(peer_id), [PROTOCOL])
        try:
            chunks, size = [], 0
            while True:
                try:
                    chunk = await stream.read(65536)
                except EOFError:  # py-libp2p ends a stream with StreamEOF (an EOFError), not b""
                    break
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise ValueError(f"{peer_id} sent more than {MAX_RESPONSE_BYTES} bytes of adverts")
                chunks.append(chunk)
        except BaseException:
            # Cut short (timed out, too much): reset, as a close (already cancelled by the timeout, and
            # only a half-close) left the stream open on both sides for the connection's life, one more
            # each time a peer that never answers was asked.
            with trio.move_on_after(RESET_TIMEOUT_S, shield=True):
                await stream.reset()
            raise
        await stream.close()
    try:
        entries = advert_entries(b"".join(chunks))
    except ValueError as exc:
        raise ValueError(f"{peer_id} answered with something that is not an AdvertList: {exc}") from None
    accepted = []
    for data in entries:
        try:
            # Relayed: the origin is the worker the advert names; its signature is what counts.
            accepted.append(book.offer(data, origin_peer_id=None))
        except AdvertRefused as exc:
            if exc.reason != "stale":  # stale = we already hold this one or a newer one
                log.info("advert relayed by %s dropped (%s): %s", peer_id, exc.reason, exc)
    return accepted
