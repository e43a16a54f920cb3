"""`dspark-node health` against real gRPC health servers on loopback, plaintext and TLS."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from node.commands import health as health_command
from deploy_helpers import free_port, parse_command

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(argv: list[str]) -> int:
    args = parse_command(health_command, ["health", *argv])
    return args.func(args)


def test_serving_exits_zero(health_server, capsys):
    servicer, port, _ = health_server
    servicer.set("", SERVING)
    assert health(["--grpc", f"127.0.0.1:{port}"]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_not_serving_exits_one(health_server, capsys):
    servicer, port, _ = health_server
    servicer.set("", NOT_SERVING)
    try:
        assert health(["--grpc", f"127.0.0.1:{port}"]) == 1
        assert "NOT_SERVING" in capsys.readouterr().out
    finally:
        servicer.set("", SERVING)


def test_unknown_service_is_reported(health_server, capsys):
    _, port, _ = health_server
    assert health(["--grpc", f"127.0.0.1:{port}", "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_forced_transport_mismatch_fails_with_reason(health_server, capsys):
    servicer, port, tls = health_server
    servicer.set("", SERVING)
    # Plaintext against a TLS server, or TLS required from a plaintext one: both refuse clearly.
    code = health(["--grpc", f"127.0.0.1:{port}", "--tls", "off" if tls else "on", "--timeout", "2"])
    assert code == 1
    err = capsys.readouterr().err
    assert ("does not speak TLS" in err) if not tls else ("unavailable" in err or "in time" in err)


def test_nothing_listening(capsys):
    assert health(["--grpc", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    assert "cannot connect" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["7440", "localhost:", "localhost:0", "localhost:70000", "::1:7440", "[nope]:1",
                                 "localhost:\u00b2", "localhost:\u0663"])
def test_bad_endpoint_is_refused_by_the_parser(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_command(health_command, ["health", "--grpc", bad])
    assert exc.value.code == 2
    assert "--grpc" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "1e308"])
def test_a_timeout_that_is_not_a_usable_number_of_seconds_is_refused(timeout, capsys):
    assert health(["--grpc", f"127.0.0.1:{free_port()}", "--timeout", timeout]) == 2
    assert f"--timeout must be more than 0 and at most 86400 seconds, got {float(timeout)}" in capsys.readouterr().err
