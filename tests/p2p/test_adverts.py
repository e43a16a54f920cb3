"""Advert checks (pure): each refusal reason, sequence memory, expiry, own adverts."""

from __future__ import annotations

import pytest

from dspark.v1.advert_pb2 import CapacityAdvert, ModelOffer
from dspark.v1.envelope_pb2 import Envelope
from node.envelope import seal
from node.identity import Identity
from node.p2p import adverts
from node.p2p.adverts import MAX_ADVERT_BYTES, AdvertBook, AdvertRefused, AdvertSigner, now_ms

WORKER = Identity.from_seed(bytes(range(32)))
OTHER = Identity.from_seed(bytes(range(1, 33)))


def capacity(model: str = "m", endpoint: str = "127.0.0.1:7440") -> CapacityAdvert:
    return CapacityAdvert(grpc_endpoint=endpoint, models=[ModelOffer(id=model)], free_slots=2)


def signed(signer: AdvertSigner | None = None, **kw) -> bytes:
    signer = signer or AdvertSigner(WORKER, ttl_seconds=30)
    return signer.sign(capacity(**kw), ["/ip4/127.0.0.1/tcp/1"]).SerializeToString()


def refusal(data: bytes, origin: str | None = WORKER.peer_id, book: AdvertBook | None = None,
            at_ms: int | None = None) -> str:
    with pytest.raises(AdvertRefused) as info:
        (book or AdvertBook()).offer(data, origin, at_ms)
    return info.value.reason


def test_valid_advert_is_stored_with_its_fields():
    book = AdvertBook()
    live = book.offer(signed(model="llama"), WORKER.peer_id)
    assert live.peer_id == WORKER.peer_id and live.serves("llama") and not live.serves("other")
    assert [a.peer_id for a in book.live()] == [WORKER.peer_id]
    assert list(live.advert.listen_addrs) == ["/ip4/127.0.0.1/tcp/1"]


def test_advert_signed_by_another_key_is_forged():
    advert = CapacityAdvert()
    advert.ParseFromString(Envelope.FromString(signed()).payload)
    forged = seal(OTHER, advert).SerializeToString()  # claims WORKER's peer ID, signed by OTHER
    assert refusal(forged) == "forged"
    assert refusal(forged, origin=OTHER.peer_id) == "forged"


def test_advert_published_by_another_origin_is_forged():
    assert refusal(signed(), origin=OTHER.peer_id) == "forged"


def test_tampered_payload_fails_the_signature():
    envelope = Envelope.FromString(signed())
    envelope.payload = envelope.payload.replace(b"127.0.0.1:7440", b"127.0.0.1:9999")
    assert refusal(envelope.SerializeToString()) == "bad_signature"


def test_unsigned_and_garbage_and_oversized_are_refused():
    envelope = Envelope.FromString(signed())
    envelope.signature = b""
    assert refusal(envelope.SerializeToString()) == "unsigned"
    assert refusal(b"\xff\xff not protobuf") == "malformed"
    assert refusal(signed(model="x" * (MAX_ADVERT_BYTES + 1))) == "oversized"


def test_sequence_must_increase_per_peer_even_after_expiry():
    signer = AdvertSigner(WORKER, ttl_seconds=1)
    old, new = signed(signer), signed(signer)
    book = AdvertBook()
    book.offer(new, WORKER.peer_id)
    assert refusal(old, book=book) == "stale"
    assert refusal(new, book=book) == "stale"  # the same advert replayed
    later = now_ms() + 500
    assert book.live(later + 1000) == []        # expired and gone from the live view...
    assert refusal(old, book=book, at_ms=later) == "stale"   # ...but its sequence is remembered


def test_a_published_advert_outranks_the_get_capacity_adverts_issued_before_it():
    """GetCapacity's adverts come from the capacity tracker, whose sequence a burst of calls pushes
    ahead of the clock; a client keeping both kinds must not drop the next published advert as stale."""
    tracked = capacity()
    tracked.sequence = now_ms() + 10**6        # the tracker's, after a burst of GetCapacity calls
    published = CapacityAdvert.FromString(AdvertSigner(WORKER, ttl_seconds=30).sign(tracked, []).payload)
    assert published.sequence >= tracked.sequence


def test_expired_and_future_adverts_are_refused():
    data = signed(AdvertSigner(WORKER, ttl_seconds=2))
    assert refusal(data, at_ms=now_ms() + 2_500) == "expired"
    assert refusal(data, at_ms=now_ms() - 60_000) == "future"


def test_bad_endpoint_is_malformed():
    assert refusal(signed(endpoint="no-port")) == "malformed"
    assert refusal(signed(endpoint="host:99999")) == "malformed"
    assert refusal(signed(endpoint="host:\u00b2")) == "malformed"     # '²': isdigit, but no int
    assert refusal(signed(endpoint="host:\u0663")) == "malformed"     # Arabic-Indic 3, read as 3 by int()
    assert refusal(signed(endpoint="host:0")) == "malformed"
    # gRPC dials the whole string, reading these prefixes as address schemes: a local socket, a list.
    for endpoint in ("unix:/run/docker.sock:80", "unix-abstract:x:1", "ipv4:10.0.0.1:1,127.0.0.1:2", "::1:7440"):
        assert refusal(signed(endpoint=endpoint)) == "malformed", endpoint
    assert AdvertBook().offer(signed(endpoint="[::1]:7440"), WORKER.peer_id).advert.grpc_endpoint == "[::1]:7440"


def test_live_adverts_are_bounded_by_their_bytes_forgetting_the_least_recent_advertiser(monkeypatch):
    """Near-maximal adverts from throwaway keys: the book holds what fits in MAX_LIVE_BYTES (lowered
    here to 64 KiB; it kept every one, ~47 KB of memory each), and a peer that advertised again
    since outlives the ones heard once."""
    monkeypatch.setattr(adverts, "MAX_LIVE_BYTES", 64 * 1024)
    big = CapacityAdvert(grpc_endpoint="127.0.0.1:1", models=[ModelOffer(id="x" * 200) for _ in range(60)])
    book = AdvertBook()
    veteran = AdvertSigner(WORKER, ttl_seconds=30)
    book.offer(veteran.sign(big, []).SerializeToString(), None)
    for _ in range(8):
        book.offer(AdvertSigner(Identity.generate(), 30).sign(big, []).SerializeToString(), None)
        book.offer(veteran.sign(big, []).SerializeToString(), None)
    held = book.live()
    assert sum(a.envelope.ByteSize() for a in held) <= 64 * 1024 and 3 <= len(held) < 9
    assert WORKER.peer_id in {a.peer_id for a in held}


@pytest.mark.parametrize("rate", [float("inf"), float("nan"), -1.0])
def test_a_speed_that_is_no_rate_is_malformed(rate):
    advert = capacity()
    advert.tokens_per_second = rate
    assert refusal(AdvertSigner(WORKER, 30).sign(advert, []).SerializeToString()) == "malformed"


def test_a_peer_id_too_long_to_be_one_is_malformed_and_not_quoted():
    advert = capacity()
    advert.peer_id = "z" * 15_000
    with pytest.raises(AdvertRefused) as info:
        AdvertBook().offer(seal(WORKER, advert).SerializeToString(), None)
    assert info.value.reason == "malformed" and "(52 characters, not 15000)" in str(info.value)
    assert len(str(info.value)) < 200


def test_an_advert_listing_more_models_than_a_worker_serves_is_malformed():
    advert = CapacityAdvert(grpc_endpoint="127.0.0.1:1", models=[ModelOffer(id=f"m{i}") for i in range(64)])
    assert AdvertBook().offer(AdvertSigner(WORKER, 30).sign(advert, []).SerializeToString(), None).serves("m63")
    advert.models.add(id="m64")
    assert refusal(AdvertSigner(WORKER, 30).sign(advert, []).SerializeToString()) == "malformed"


def test_own_adverts_are_checked_but_not_listed():
    book = AdvertBook(self_peer_id=WORKER.peer_id)
    book.offer(signed(), WORKER.peer_id)
    assert book.live() == []


def test_relayed_advert_is_accepted_on_its_signature_alone():
    book = AdvertBook()
    assert book.offer(signed(), origin_peer_id=None).peer_id == WORKER.peer_id


def test_signer_sequence_is_strictly_increasing_and_above_wall_clock_ms():
    signer = AdvertSigner(WORKER, ttl_seconds=5)
    before = now_ms()
    seqs = [CapacityAdvert.FromString(signer.sign(capacity(), []).payload).sequence for _ in range(5)]
    assert seqs == sorted(set(seqs)) and seqs[0] >= before
    with pytest.raises(ValueError):
        AdvertSigner(WORKER, ttl_seconds=0)
