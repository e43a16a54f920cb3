"""The daemon: NodeConfig -> identity -> ledger -> engine -> event bus -> services, supervised.

Services start in this order and stop in reverse: engine, HTTP (metrics + dashboard), gRPC, p2p
(only when p2p.listen is set). SIGTERM / SIGINT start the graceful stop: adverts stop first, then
the gRPC service drains (node/server.py) while the dashboard and metrics still show the jobs
finishing, then HTTP, then the engine. Exit 0 when every part stopped cleanly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from engine.async_engine import AsyncEngine, load_async_engine
from engine.config import EngineConfig
from node import tls
from node.capacity import CapacityTracker
from node.config import NodeConfig, split_host_port
from node.data_dir import DataDir, removed_if_the_start_fails
from node.doctor import bound_socket, tcp_listen_of_multiaddr
from node.events import EngineRound, EventBus
from node.gpu import detect_gpus
from node.http_server import HttpService
from node.identity import Identity
from node.ledger import LEDGER_FILE, Ledger
from node.lifecycle import Service, Supervisor
from node.p2p.service import P2PService
from node.server import GrpcService

log = logging.getLogger(__name__)


class SetupError(ValueError):
    """The machine does not allow this config (a port taken, a data dir that cannot be made)."""


LOCK_FILE = "node.lock"     # in the data dir, locked by the running node


def key_path(config: NodeConfig) -> Path:
    return config.data_dir / "node.key"


def check_ports_free(config: NodeConfig) -> None:
    """Bind every TCP address the node will listen on, all at once, then let them go.

    Run before the model loads (seconds to minutes), so a taken port is reported at once, not
    after the load. A program that takes a port in between is still caught when the service
    binds it; this only makes the common case fast and clear. Port 0 always binds.
    """
    listens = [("grpc_listen", config.grpc_listen), ("http_listen", config.http_listen)]
    listens += [("p2p.listen", tcp) for tcp in map(tcp_listen_of_multiaddr, config.p2p.listen) if tcp]
    with contextlib.ExitStack() as held:     # held together: two settings naming one port collide too
        for field, listen in listens:
            host, port = split_host_port(listen)
            try:
                sock = held.enter_context(bound_socket(host, port))
            except OSError as exc:
                # Only a port in use has a program to stop; an address not on this machine, or a host
                # name that does not resolve, is the setting's own.
                in_use = exc.errno == errno.EADDRINUSE
                holder = "stop the program holding the port (another node?) or " if in_use else ""
                raise SetupError(f"{field} {listen}: cannot listen there ({exc.strerror}); {holder}change "
                                 f"{field}") from None
            if port:
                sock.listen()    # a listening socket is what makes a second bind of the port fail


def make_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise SetupError(f"data_dir {path} is a file, not a directory; give a directory (--data-dir)") from None
    except OSError as exc:
        raise SetupError(f"data_dir {path} cannot be created: {exc.strerror}") from None


@contextlib.contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's lock while the node runs. A second node on the same dir would sign with
    the same key, and its start would give the first node's running jobs 'failed' receipts
    (Ledger.recover): it is refused instead. The kernel drops the lock when the process dies."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SetupError(f"data_dir {data_dir} is in use by another running node; stop it, or give this "
                         "one a data dir of its own (--data-dir)") from None
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def data_dir_of_this_start(path: Path) -> Iterator[DataDir]:
    """Make and lock the data dir. A start that made it and fails before the model is loaded (a
    mistyped model, a device that is not there, Ctrl-C) removes it again, with the key and ledger it
    wrote."""
    with removed_if_the_start_fails(path) as data_dir:
        make_data_dir(path)
        with locked(path):
            yield data_dir


async def run_daemon(config: NodeConfig) -> int:
    """Run the node until SIGTERM/SIGINT; prints one JSON 'ready' line on stdout once serving."""
    # The lock first: a second node on this data dir with the same settings would find the first
    # one's ports taken, and be told to stop "the program holding the port", not that the data dir
    # is in use. A data dir this start made is removed again when a port is taken.
    with data_dir_of_this_start(config.data_dir) as data_dir:
        check_ports_free(config)
        return await _run(config, data_dir)


def check_key_not_lost(config: NodeConfig) -> None:
    """A ledger without its key means the key was lost (a volume not mounted, a file deleted): a new
    key would be another node, which the ledger refuses, and it would be left in the key's place."""
    ledger = config.data_dir / LEDGER_FILE
    if ledger.exists() and not key_path(config).exists():
        raise SetupError(f"{key_path(config)} is missing, but {ledger} holds the receipts it signed: restore the "
                         "key from backup (a new key would be a new node, with none of these receipts)")


async def load_engine(config: EngineConfig) -> AsyncEngine:
    """Load the model in a daemon thread. A load (a conversion, an SPS profile: a minute on a CPU, more
    for a large model) cannot be interrupted, and the process waits at exit for asyncio.to_thread's
    threads: there, a Ctrl-C during the load held the node until the load ended. A daemon thread is
    left to die with the process; the caches it writes are renamed into place, never left half made."""
    loaded: concurrent.futures.Future[AsyncEngine] = concurrent.futures.Future()

    def load() -> None:
        loaded.set_running_or_notify_cancel()    # a running future stays settable after the await is cancelled
        try:
            loaded.set_result(load_async_engine(config))
        except BaseException as exc:    # whatever ends the load must reach the await, or the start hangs
            loaded.set_exception(exc)

    threading.Thread(target=load, name="model-load", daemon=True).start()
    return await asyncio.wrap_future(loaded)


async def _run(config: NodeConfig, data_dir: DataDir) -> int:
    check_key_not_lost(config)
    identity = Identity.load_or_create(key_path(config))
    tls_material = tls.load_or_create(config.data_dir / "tls", identity.peer_id) if config.grpc_tls else None
    ledger = await asyncio.to_thread(Ledger.open, config.data_dir / LEDGER_FILE, identity)
    try:
        recovered = await asyncio.to_thread(ledger.recover)
        if recovered:
            log.warning("ledger: %d job(s) left running by an earlier crash got 'failed' receipts", recovered)
        engine = await load_engine(config.engine)
        data_dir.kept = True
        gpu = await asyncio.to_thread(detect_gpus)
        events = EventBus()
        capacity = CapacityTracker(config, identity.peer_id, engine.info, gpu.to_proto(), engine)
        events.subscribe(capacity.observe)
        loop = asyncio.get_running_loop()
        # Round reports come from the engine thread; the bus is the loop's.
        engine.add_round_listener(lambda report: loop.call_soon_threadsafe(events.publish, EngineRound(report)))
        grpc_service = GrpcService(config, identity, engine, ledger, events, capacity, tls_material)
        http = HttpService(config, identity, engine, ledger, events, capacity)
        services: list[Service] = [engine, http, grpc_service]
        p2p = P2PService(config, identity, events, capacity) if config.p2p.listen else None
        if p2p is not None:
            services.append(p2p)
        supervisor = Supervisor(services, stop_timeout_s=config.admission.grace_s + 30)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.request_stop)

        def ready() -> None:
            # What other nodes pass as --bootstrap; the p2p log line saying it is at INFO.
            p2p_addrs = p2p.network.listen_addrs() if p2p is not None and p2p.network is not None else []
            http.others_listen_on(grpc_service.endpoint, p2p_addrs)
            print(json.dumps({"event": "ready", "peer_id": identity.peer_id, "grpc": grpc_service.endpoint,
                              "tls": tls_material is not None, "http": http.url, "model": engine.info.model_id,
                              "p2p": p2p_addrs, "recovered": recovered}), flush=True)

        report = await supervisor.run(on_started=ready)
    finally:
        await asyncio.to_thread(ledger.close)
    for name, what in report.failed:
        print(f"dspark-node: {name}: {what}", file=sys.stderr)
    return 0 if report.ok else 1
