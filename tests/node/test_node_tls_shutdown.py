"""A daemon serving TLS on loopback (tls.mode = "on"): the certificate's binding to the peer ID,
SIGTERM during a job, and what survives a restart (key, certificate, replay cache)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from node.client import ClientError, JobRefused, WorkerClient
from node.identity import Identity
from node.receipts import verify_receipt
from node.tls import SERVER_NAME, fetch_server_cert, fingerprint
from node.tls import load_or_create as load_or_create_tls
from node_harness import ROOT, node_toml, start_daemon

pytestmark = pytest.mark.slow

GRACE_S = 2
EXTRA = f"""
[tls]
mode = "on"
[admission]
grace_s = {GRACE_S}
"""


def http_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tls-daemon")


@pytest.fixture(scope="module")
def daemon(tiny_model, data_dir):
    node = start_daemon(data_dir, node_toml(tiny_model, EXTRA))
    yield node
    node.stop()


@pytest.mark.asyncio
async def test_tls_client_checks_the_certificate_binding(daemon, data_dir):
    assert daemon.ready["tls"] is True
    assert stat.S_IMODE((data_dir / "node.key").stat().st_mode) == 0o600
    async with await WorkerClient.connect(daemon.grpc, Identity.generate(), peer_id=daemon.peer_id) as client:
        assert client.advert.tls_cert_sha256 == fingerprint((data_dir / "tls" / "cert.pem").read_bytes())
        result = await client.run(client.sign_job(text="Hello", max_new_tokens=3), timeout_s=60)
        assert result.receipt.output_tokens == len(result.output_ids)
    with pytest.raises(ClientError, match="cannot reach"):
        await WorkerClient.connect(daemon.grpc, Identity.generate(), tls="off", timeout_s=5)


@pytest.mark.asyncio
async def test_a_relaying_man_in_the_middle_is_detected(daemon, tmp_path):
    """A server with its own certificate that relays the real node's signed advert."""
    host, port = daemon.grpc.rsplit(":", 1)
    async with grpc.aio.secure_channel(daemon.grpc, grpc.ssl_channel_credentials(
            root_certificates=fetch_server_cert(host, int(port))),
            options=[("grpc.ssl_target_name_override", SERVER_NAME)]) as upstream:
        relay = upstream.unary_unary("/dspark.v1.Worker/GetCapacity")

        async def get_capacity(request: bytes, context) -> bytes:
            return await relay(request)

        mitm = grpc.aio.server()
        mitm.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("dspark.v1.Worker", {
            "GetCapacity": grpc.unary_unary_rpc_method_handler(get_capacity)})])
        own = load_or_create_tls(tmp_path / "mitm", daemon.peer_id)
        mitm_port = mitm.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(own.key_pem, own.cert_pem)]))
        await mitm.start()
        try:
            with pytest.raises(ClientError, match="possible interception"):
                await WorkerClient.connect(f"127.0.0.1:{mitm_port}", Identity.generate(), peer_id=daemon.peer_id,
                                           tls="on")
        finally:
            await mitm.stop(None)



@pytest.mark.asyncio
async def test_connections_that_fail_the_tls_handshake_leave_nothing_in_the_log(daemon):
    """Anyone may connect: grpc's core wrote a line per failed handshake ("Handshake failed with error
    SSL_ERROR_SSL: ...") whatever the --log-level, so a port scanner wrote into the node's log at will."""
    host, port = daemon.grpc.rsplit(":", 1)
    for hello in (b"\x16\x03\x01\x00\x05hello", b"GET / HTTP/1.1\r\n\r\n") * 5:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(hello)
            try:
                sock.recv(1024)     # the server's alert, or its close
            except ConnectionResetError:
                pass
    async with await WorkerClient.connect(daemon.grpc, Identity.generate(), peer_id=daemon.peer_id) as client:
        await client.run(client.sign_job(text="Hi", max_new_tokens=1), timeout_s=60)
    assert "Handshake failed" not in daemon.stderr_text()

def test_submit_command_streams_and_verifies(daemon, tmp_path):
    key = tmp_path / "client.key"
    ok = subprocess.run([sys.executable, "-m", "node.cli", "submit", "--node", daemon.grpc, "--prompt", "Hello",
                         "--max-new-tokens", "4", "--key", str(key)], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert f"verified (worker {daemon.peer_id})" in ok.stderr and "4 tokens" in ok.stderr
    refused = subprocess.run([sys.executable, "-m", "node.cli", "submit", "--node", daemon.grpc, "--prompt", "Hi",
                              "--max-price", "1", "--key", str(key)], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 1
    assert "refused: FAILED_PRECONDITION: price cap 1 is below this node's price" in refused.stderr


@pytest.mark.asyncio
async def test_sigterm_during_a_job_then_restart(daemon, tiny_model, data_dir):
    identity = Identity.generate()
    async with await WorkerClient.connect(daemon.grpc, identity, peer_id=daemon.peer_id) as client:
        first = client.sign_job(text="Hi", max_new_tokens=2)
        done = await client.run(first, timeout_s=60)
        long_job = client.sign_job(text="Count:", max_new_tokens=2000)
        events = client.stream(long_job, timeout_s=120)
        async for event in events:
            if event.WhichOneof("event") == "chunk":
                break
        stopped_at = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # Draining: new jobs are refused while the running one gets its grace period.
        with pytest.raises(JobRefused) as info:
            await client.run(client.sign_job(text="Hi", max_new_tokens=1), timeout_s=30)
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.UNAVAILABLE, "shutting_down")
        # The dashboard and metrics stay up while the running job drains (they stopped at the signal).
        status = await asyncio.to_thread(http_json, daemon.ready["http"] + "/api/v1/status")
        assert status["load"]["active"] == 1
        rest = [event async for event in events]
        result = rest[-1].result
        assert result.finish_reason == "cancelled"
        receipt = verify_receipt(result.receipt, daemon.peer_id)
        assert receipt.outcome == "cancelled" and 0 < receipt.output_tokens < 2000
    assert await asyncio.to_thread(daemon.proc.wait, 60) == 0, daemon.stderr_text()[-3000:]
    assert time.monotonic() - stopped_at < GRACE_S + 20

    restarted = start_daemon(data_dir, node_toml(tiny_model, EXTRA))
    try:
        assert restarted.peer_id == daemon.peer_id        # the key survived
        async with await WorkerClient.connect(restarted.grpc, identity, peer_id=daemon.peer_id) as client:
            assert client.advert.tls_cert_sha256 == fingerprint((data_dir / "tls" / "cert.pem").read_bytes())
            assert (await client.get_receipt(first)) == done.receipt
            # The replay cache is in the ledger: the same signed job, or a new one reusing its id,
            # is refused after a restart.
            for job in (first, client.sign_job(text="Hi", max_new_tokens=2, job_id=done.job_id)):
                with pytest.raises(JobRefused) as info:
                    await client.run(job, timeout_s=30)
                assert (info.value.code, info.value.reason) == (grpc.StatusCode.ALREADY_EXISTS, "replayed")
            assert (await client.capacity()).free_slots == 2
    finally:
        assert restarted.stop() == 0

