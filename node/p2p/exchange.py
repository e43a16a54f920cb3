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
from google.protobuf.message import DecodeError
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


def serve_adverts(host: P2PHost, book: AdvertBook, own: Callable[[], Envelope | None]) -> None:
    """Trio side: register the responder on the host."""

    async def handle(stream) -> None:
        try:
            response = AdvertList()
            mine = own()
            if mine is not None:
                response.adverts.append(mine)
            response.adverts.extend(a.envelope for a in book.live()[: MAX_ADVERTS - 1])
            await stream.write(response.SerializeToString())
        except Exception as exc:  # a peer that hangs up early is not our failure
            log.debug("serving adverts failed: %s", exc)
        finally:
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
        finally:
            await stream.close()
    response = AdvertList()
    try:
        response.ParseFromString(b"".join(chunks))
    except DecodeError:
        raise ValueError(f"{peer_id} answered with something that is not an AdvertList") from None
    accepted = []
    for envelope in response.adverts[:MAX_ADVERTS]:
        try:
            # Relayed: the origin is the worker the advert names; its signature is what counts.
            accepted.append(book.offer(envelope.SerializeToString(), origin_peer_id=None))
        except AdvertRefused as exc:
            if exc.reason != "stale":  # stale = we already hold this one or a newer one
                log.info("advert relayed by %s dropped (%s): %s", peer_id, exc.reason, exc)
    return accepted
