"""The gRPC server as a lifecycle service: Worker + standard health checking + server reflection.

TLS unless the config allows plaintext (loopback, or tls.mode = "off"). On stop: health turns
NOT_SERVING, new jobs are refused (UNAVAILABLE), running jobs get the grace period to finish and
are then cancelled (each still gets its receipt), and only then does the server close.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dspark.v1 import worker_pb2, worker_pb2_grpc
from node import keepalive
from node.capacity import CapacityTracker
from node.config import NodeConfig, split_host_port
from node.events import EventBus
from node.identity import Identity
from node.interceptor import AnswerTooLate, ErrorInterceptor
from node.jobs import JobTable
from node.ledger import Ledger
from node.service import WorkerServicer, build_policy
from node.tls import TlsMaterial

if TYPE_CHECKING:     # engine.async_engine imports torch; the daemon has loaded it by then
    from engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
_MAX_MESSAGE_BYTES = 2 << 20     # an envelope's payload is capped at 1 MiB (node/envelope.py)


class GrpcService:
    name = "grpc"

    def __init__(self, config: NodeConfig, identity: Identity, engine: AsyncEngine, ledger: Ledger,
                 events: EventBus, capacity: CapacityTracker, tls: TlsMaterial | None):
        self._config = config
        self._tls = tls
        self._capacity = capacity
        info = engine.info
        self.jobs = JobTable(engine, ledger, events, info, config.pricing.price_for(info.model_id),
                             config.pricing.per_gpu_second_micros)
        self._servicer = WorkerServicer(identity, build_policy(config, identity.peer_id, engine), engine,
                                        ledger, events, self.jobs, capacity, config.heartbeat_s)
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self.endpoint = ""          # HOST:PORT actually bound (the configured port may be 0)

    async def start(self) -> None:
        AnswerTooLate.install()
        server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES), ("grpc.so_reuseport", 0),
            *keepalive.server_options()])
        worker_pb2_grpc.add_WorkerServicer_to_server(self._servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server)
        host, _ = split_host_port(self._config.grpc_listen)
        if self._tls is not None:
            credentials = grpc.ssl_server_credentials([(self._tls.key_pem, self._tls.cert_pem)])
            port = server.add_secure_port(self._config.grpc_listen, credentials)
        else:
            port = server.add_insecure_port(self._config.grpc_listen)
        if port == 0:
            raise OSError(f"cannot listen on {self._config.grpc_listen} (address in use or not local)")
        await server.start()
        self._server = server
        self.endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if not self._config.p2p.announce_grpc:
            self._capacity.grpc_endpoint = self.endpoint
        self._capacity.tls_cert_sha256 = self._tls.fingerprint if self._tls else b""
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC listening on %s (%s)", self.endpoint, "TLS" if self._tls else "plaintext")

    async def stop(self) -> None:
        if self._server is None:
            return
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        cancelled = await self.jobs.drain(self._config.admission.grace_s)
        if cancelled:
            log.warning("shutdown: cancelled %d job(s) still running after the %.0f s grace period",
                        cancelled, self._config.admission.grace_s)
        # The drained jobs' final events (results with receipts) are queued; give the RPCs a moment
        # to deliver them before the server closes.
        await self._server.stop(grace=2.0)
        self._servicer.close()
        self._server = None
