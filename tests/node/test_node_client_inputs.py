"""WorkerClient.sign_job refuses, with a message, what cannot go on the wire (no worker dialled)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dspark.v1.advert_pb2 import CapacityAdvert, ModelOffer
from node.client import WorkerClient
from node.identity import Identity

UNDECODABLE = "a\udcff\udcfeb"      # what Python makes of the bytes 61 ff fe 62 in argv


def sign(**prompt):
    async def main():
        channel = grpc.aio.insecure_channel("127.0.0.1:9")     # never used: signing dials nothing
        advert = CapacityAdvert(peer_id=Identity.generate().peer_id, models=[ModelOffer(id="m")])
        try:
            return WorkerClient(channel, Identity.generate(), advert).sign_job(**prompt)
        finally:
            await channel.close()
    return asyncio.run(main())


@pytest.mark.parametrize("prompt", [{"text": UNDECODABLE}, {"chat": [{"role": "user", "content": UNDECODABLE}]},
                                    {"text": "fine", "stop": [UNDECODABLE]}])
def test_text_that_is_not_utf8_is_refused_with_a_message(prompt):
    with pytest.raises(ValueError, match=r"not valid UTF-8 text: character '\\udcff' at position 1") as info:
        sign(**prompt)
    assert not isinstance(info.value, UnicodeError)


def test_valid_text_is_signed():
    assert sign(text="héllo ✓").payload_type == "dspark.v1.JobRequest"
