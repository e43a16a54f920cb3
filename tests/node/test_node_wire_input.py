"""Bytes from strangers on the Worker service of a real daemon: malformed and fuzzed messages, signed
or not, get a clean gRPC refusal, and the node goes on serving."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspark.v1 import worker_pb2, worker_pb2_grpc
from dspark.v1.envelope_pb2 import Envelope
from node.envelope import pae
from node.identity import Identity
from node_harness import node_toml, start_daemon

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    node = start_daemon(tmp_path_factory.mktemp("wire"), node_toml(tiny_model))
    yield node
    assert node.stop() == 0, node.stderr_text()[-3000:]


@pytest.mark.asyncio
async def test_malformed_bytes_are_refused_not_crashed_on(daemon):
    async with grpc.aio.insecure_channel(daemon.grpc) as channel:
        submit = channel.unary_stream("/dspark.v1.Worker/Submit")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in submit(b"\xff\xff\xff", timeout=10):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        capacity = await worker_pb2_grpc.WorkerStub(channel).GetCapacity(worker_pb2.GetCapacityRequest(), timeout=10)
        assert capacity.payload_type == "dspark.v1.CapacityAdvert"


_ENVELOPES = st.builds(
    Envelope, payload_type=st.sampled_from(["dspark.v1.JobRequest", "dspark.v1.CancelJob", "", "x"]),
    payload=st.binary(max_size=300), public_key=st.binary(max_size=40), signature=st.binary(max_size=70))
_CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND,
          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED}


def _status(call) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=300), _ENVELOPES.map(lambda e: e.SerializeToString()),
                     st.binary(max_size=300).map(lambda p: seal_raw(p).SerializeToString())),
       method=st.sampled_from(["Submit", "Cancel", "Acknowledge"]))
def test_fuzzed_requests_get_clean_refusals(daemon, raw, method):
    with grpc.insecure_channel(daemon.grpc) as channel:
        if method == "Submit":
            code = _status(channel.unary_stream(f"/dspark.v1.Worker/{method}")(raw, timeout=10))
        else:
            try:
                channel.unary_unary(f"/dspark.v1.Worker/{method}")(raw, timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
    assert code in _CLEAN, code


def seal_raw(payload: bytes) -> Envelope:
    """A correctly signed envelope around arbitrary bytes: gets past the signature to the parser."""
    envelope = Envelope(payload_type="dspark.v1.JobRequest", payload=payload, public_key=FUZZER.public_key)
    envelope.signature = FUZZER.sign(pae(envelope.payload_type, payload))
    return envelope


FUZZER = Identity.from_seed(b"f" * 32)
