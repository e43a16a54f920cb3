"""One peer network per test module: a p2p bootstrap peer and two `dspark-node run` workers (tiny
model, tests.p2p.test_failover_daemons.PRICES: the cheap one charges 1000 micros per million tokens
and 1 per GPU-second, the dear one 5,000,000 per million tokens), plus the gateway processes the
tests start."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.gateway.harness import GatewayProc, start_gateway, wait_for_workers
from tests.p2p.conftest import Peer, ready_peer, spawn_peer
from tests.p2p.test_failover_daemons import PRICES, worker_toml
from node_harness import Daemon, start_daemon  # noqa: E402  (on sys.path via tests.gateway.harness)

API_KEY = "test-key-0123456789abcdef"


@dataclass
class Network:
    bootstrap: Peer
    cheap: Daemon
    dear: Daemon

    @property
    def model(self) -> str:
        return self.cheap.ready["model"]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    from engine.testing import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    bootstrap = ready_peer(spawn_peer())
    with ThreadPoolExecutor(len(PRICES)) as pool:   # start-up dominates; the two overlap
        futures = [pool.submit(start_daemon, tmp_path_factory.mktemp(f"worker{prices[0]}"),
                               worker_toml(model, bootstrap.addr, *prices)) for prices in PRICES]
    daemons = [f.result() for f in futures if f.exception() is None]
    try:
        if len(daemons) < len(PRICES):
            raise next(f.exception() for f in futures if f.exception() is not None)
        yield Network(bootstrap, *daemons)
    finally:
        for daemon in daemons:
            daemon.stop(signal.SIGKILL)
        bootstrap.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def gateway(network, tmp_path_factory):
    """The gateway every test talks to: loopback, one API key, no budget."""
    proc = start_gateway(tmp_path_factory.mktemp("gateway"), network.bootstrap.addr, "--api-key", API_KEY)
    try:
        wait_for_workers(proc.base_url, network.model, 2, API_KEY)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gateway_factory(network, tmp_path_factory):
    started: list[GatewayProc] = []

    def factory(data_dir, *args: str) -> GatewayProc:
        proc = start_gateway(data_dir, network.bootstrap.addr, *args)
        started.append(proc)
        return proc

    yield factory
    for proc in started:
        proc.stop(signal.SIGKILL)
