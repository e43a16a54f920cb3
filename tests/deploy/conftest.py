"""Fixtures for the deployment tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from deploy_helpers import start_server
from grpc_health.v1 import health, health_pb2_grpc


@pytest.fixture(scope="module", params=[False, True], ids=["plaintext", "tls"])
def health_server(request) -> Iterator[tuple[health.HealthServicer, int, bool]]:
    servicer = health.HealthServicer()
    server, port = start_server([lambda s: health_pb2_grpc.add_HealthServicer_to_server(servicer, s)],
                                tls=request.param)
    yield servicer, port, request.param
    server.stop(grace=None)
