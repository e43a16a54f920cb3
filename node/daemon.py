"""The daemon: NodeConfig -> identity -> ledger -> engine -> event bus -> services, supervised.

Services start in this order and stop in reverse: engine, gRPC, HTTP (metrics + dashboard), p2p
(only when p2p.listen is set). SIGTERM / SIGINT start the graceful stop: adverts stop first, then
the gRPC service drains (node/server.py), then the engine. Exit 0 when every part stopped cleanly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from engine.async_engine import load_async_engine
from node import tls
from node.capacity import CapacityTracker
from node.config import NodeConfig
from node.events import EngineRound, EventBus
from node.gpu import detect_gpus
from node.http_server import HttpService
from node.identity import Identity
from node.ledger import Ledger
from node.lifecycle import Service, Supervisor
from node.p2p.service import P2PService
from node.server import GrpcService

log = logging.getLogger(__name__)


def key_path(config: NodeConfig) -> Path:
    return config.data_dir / "node.key"


async def run_daemon(config: NodeConfig) -> int:
    """Run the node until SIGTERM/SIGINT; prints one JSON 'ready' line on stdout once serving."""
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = Identity.load_or_create(key_path(config))
    tls_material = tls.load_or_create(config.data_dir / "tls", identity.peer_id) if config.grpc_tls else None
    ledger = await asyncio.to_thread(Ledger.open, config.data_dir / "ledger.sqlite3", identity)
    try:
        recovered = await asyncio.to_thread(ledger.recover)
        if recovered:
            log.warning("ledger: %d job(s) left running by an earlier crash got 'failed' receipts", recovered)
        engine = await asyncio.to_thread(load_async_engine, config.engine)
        gpu = await asyncio.to_thread(detect_gpus)
        events = EventBus()
        capacity = CapacityTracker(config, identity.peer_id, engine.info, gpu.to_proto(), engine)
        events.subscribe(capacity.observe)
        loop = asyncio.get_running_loop()
        # Round reports come from the engine thread; the bus is the loop's.
        engine.add_round_listener(lambda report: loop.call_soon_threadsafe(events.publish, EngineRound(report)))
        grpc_service = GrpcService(config, identity, engine, ledger, events, capacity, tls_material)
        http = HttpService(config, identity, engine, ledger, events, capacity)
        services: list[Service] = [engine, grpc_service, http]
        if config.p2p.listen:
            services.append(P2PService(config, identity, events, capacity))
        supervisor = Supervisor(services, stop_timeout_s=config.admission.grace_s + 30)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.request_stop)

        def ready() -> None:
            print(json.dumps({"event": "ready", "peer_id": identity.peer_id, "grpc": grpc_service.endpoint,
                              "tls": tls_material is not None, "http": http.url, "model": engine.info.model_id,
                              "recovered": recovered}), flush=True)

        report = await supervisor.run(on_started=ready)
    finally:
        await asyncio.to_thread(ledger.close)
    for name, what in report.failed:
        print(f"dspark-node: {name}: {what}", file=sys.stderr)
    return 0 if report.ok else 1
