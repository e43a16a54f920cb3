"""The container's HEALTHCHECK command and `doctor` against a real `dspark-node run` daemon (tiny
random model, TLS on, as a containerised node bound off loopback serves it), as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from deploy_helpers import free_port

from node.identity import Identity
from node.probe import ProbeError, health_status, parse_endpoint

pytestmark = pytest.mark.slow


def cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *argv], capture_output=True, text=True, timeout=120,
                          env=env)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from engine.testing import make_tiny_model

    home = tmp_path_factory.mktemp("live")
    tiny = make_tiny_model(home / "tiny")
    grpc_listen, http_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPARK_")}
    env.update(DSPARK_TLS__MODE="on", DSPARK_ENGINE__MODEL=str(tiny), DSPARK_GRPC_LISTEN=grpc_listen,
               DSPARK_HTTP_LISTEN=http_listen, DSPARK_P2P__LISTEN="[]", DSPARK_DATA_DIR=str(home / "data"))
    log = (home / "node.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "run"], stdout=log, stderr=subprocess.STDOUT, env=env)
    endpoint = parse_endpoint(grpc_listen)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"node exited with {proc.returncode}:\n{(home / 'node.log').read_text()[-3000:]}")
        try:
            if health_status(endpoint, "auto", timeout=1.0) == "SERVING":
                break
        except (ProbeError, grpc.RpcError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"node not SERVING after 120 s:\n{(home / 'node.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield proc, env, grpc_listen, home
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.close()


def healthcheck(*argv: str) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK and the Kubernetes probes run exactly this module."""
    return subprocess.run([sys.executable, "-m", "node.commands.health", *argv], capture_output=True, text=True,
                          timeout=60)


def test_healthcheck_command_sees_the_tls_node_serving(node):
    _, _, grpc_listen, _ = node
    result = healthcheck("--grpc", grpc_listen, "--timeout", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{grpc_listen}: SERVING"
    assert healthcheck("--grpc", grpc_listen, "--tls", "off", "--timeout", "3").returncode == 1


def test_doctor_recognises_the_running_node_and_reads_its_clock(node):
    _, env, grpc_listen, home = node
    result = cli("doctor", "--peer", grpc_listen, "--min-free-gb", "0", env=env)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert f"[ok]   port grpc_listen: {grpc_listen} is served by the running node" in out
    assert "[ok]   port http_listen:" in out and "served by the running node" in out.split("http_listen:")[1]
    assert "[ok]   clock: this clock is" in out  # the node's signed advert, verified, same machine
    key = home / "data" / "node.key"
    assert f"[ok]   key: {key} (mode 600), peer ID 12D3KooW" in out


def test_doctor_fails_the_ports_of_the_running_node_for_another_data_dir(node, tmp_path):
    """The node runs from one data dir; doctor for a config with its ports but another data dir (the
    operator's second node, or a forgotten --data-dir) would see `run` fail with the port in use."""
    _, env, grpc_listen, home = node
    peer_id = Identity.load(home / "data" / "node.key").peer_id
    result = cli("doctor", "--data-dir", str(tmp_path / "other"), "--min-free-gb", "0", env=env)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    held = f"is held by another dspark node (peer ID {peer_id}), not this data dir's"
    assert f"[FAIL] port grpc_listen: {grpc_listen} {held}" in out
    assert "[FAIL] port http_listen:" in out and held in out.split("http_listen:")[1]
    assert "served by the running node" not in out


def test_healthcheck_fails_once_the_node_stops(node):
    proc, _, grpc_listen, _ = node
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    result = healthcheck("--grpc", grpc_listen, "--timeout", "2")
    assert result.returncode == 1 and "cannot connect" in result.stderr
