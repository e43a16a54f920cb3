"""WorkerClient.sign_job refuses, with a message, what cannot go on the wire (no worker dialled)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dspark.v1 import job_pb2
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


@pytest.mark.parametrize("top_p", [1e-50, 7e-46])
def test_a_tiny_top_p_is_not_signed_as_0_which_means_no_filter(top_p):
    sampling = job_pb2.JobRequest.FromString(sign(text="hi", top_p=top_p).payload).sampling
    assert 0 < sampling.top_p < 1e-44
