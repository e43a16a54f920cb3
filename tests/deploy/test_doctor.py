"""`dspark-node doctor` on this (GPU-less) machine, and each check against real sockets, files and a
real gRPC peer serving signed capacity adverts."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
from deploy_helpers import free_port, parse_command, start_server
from grpc_health.v1 import health, health_pb2_grpc

from dspark.v1 import advert_pb2, worker_pb2_grpc
from node.commands import doctor as doctor_command
from node.config import load_config
from node.doctor import (check_clock, check_disk, check_exposure, check_key, check_port,
                         tcp_listen_of_multiaddr)
from node.envelope import seal
from node.identity import Identity
from node.probe import parse_endpoint

no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")


def doctor(argv: list[str]) -> int:
    args = parse_command(doctor_command, ["doctor", *argv])
    return args.func(args)


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


def free_listens(monkeypatch) -> None:
    """Point the node's three ports at free ones, through the DSPARK_* environment as an operator would."""
    monkeypatch.setenv("DSPARK_GRPC_LISTEN", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("DSPARK_HTTP_LISTEN", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("DSPARK_P2P__LISTEN", f'["/ip4/127.0.0.1/tcp/{free_port()}"]')


@no_gpu_here
def test_reports_no_gpu_and_passes_on_a_cpu_node(data_dir, monkeypatch, capsys):
    free_listens(monkeypatch)
    assert doctor(["--data-dir", str(data_dir), "--min-free-gb", "0"]) == 0
    out = capsys.readouterr().out
    assert "[warn] gpu: no GPU:" in out
    expected_reason = "CPU-only build" if torch.version.cuda is None else "sees no usable GPU"
    assert expected_reason in out
    assert "[skip] cuda:" in out
    assert "0 failed" in out


@no_gpu_here
@pytest.mark.parametrize("how", ["flag", "config"])
def test_no_gpu_fails_when_one_is_required(how, data_dir, monkeypatch, capsys):
    free_listens(monkeypatch)
    argv = ["--data-dir", str(data_dir), "--min-free-gb", "0"]
    if how == "flag":
        argv.append("--require-gpu")
    else:
        monkeypatch.setenv("DSPARK_ENGINE__DEVICE", "cuda")
    assert doctor(argv) == 1
    out = capsys.readouterr().out
    assert "[FAIL] gpu: no GPU" in out
    assert "fix: start the container with GPUs" in out


def test_bad_config_is_reported_not_raised(tmp_path, capsys):
    config = tmp_path / "node.toml"
    config.write_text('grpc_listen = "nowhere"\n')
    assert doctor(["--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] config:" in out and "grpc_listen" in out


@pytest.mark.parametrize("flag, value", [("--min-free-gb", "-1"), ("--min-free-gb", "nan"), ("--min-free-gb", "inf"),
                                         ("--max-skew-s", "nan"), ("--max-skew-s", "-0.5")])
def test_a_threshold_that_is_negative_or_not_finite_is_refused(capsys, flag, value):
    assert doctor([flag, value]) == 2
    assert f"doctor: {flag} must be a finite number, not negative; got {float(value)}" in capsys.readouterr().err


def test_key_missing_present_open_and_corrupt(data_dir):
    assert check_key(data_dir).status == "ok"
    identity = Identity.generate()
    identity.save(data_dir / "node.key")
    found = check_key(data_dir)
    assert found.status == "ok" and identity.peer_id in found.detail
    os.chmod(data_dir / "node.key", 0o644)
    loose = check_key(data_dir)
    assert loose.status == "fail" and f"chmod 600 {data_dir / 'node.key'}" == loose.fix
    os.chmod(data_dir / "node.key", 0o600)
    (data_dir / "node.key").write_text("not a key\n")
    assert check_key(data_dir).status == "fail"


def test_a_key_link_to_nothing_fails_the_key_check_as_run_refuses_it(data_dir):
    data_dir.mkdir()
    (data_dir / "node.key").symlink_to(data_dir / "secrets" / "node.key")     # a secret volume not mounted
    result = check_key(data_dir)
    assert result.status == "fail" and "which does not exist" in result.detail and "remove the link" in result.fix


def test_a_ledger_without_its_key_fails_the_key_check(data_dir):
    data_dir.mkdir()
    (data_dir / "ledger.sqlite3").write_bytes(b"")
    result = check_key(data_dir)
    assert result.status == "fail" and "node.key is missing" in result.detail and "backup" in result.fix


def test_a_data_dir_run_would_refuse_fails_the_key_check(tmp_path):
    (tmp_path / "file").write_text("")
    for data_dir in (tmp_path / "file", tmp_path / "file" / "below"):
        result = check_key(data_dir)
        assert result.status == "fail" and f"{tmp_path / 'file'} is a file, not a directory" in result.detail
    (tmp_path / "node.key").mkdir()
    result = check_key(tmp_path)
    assert (result.status, result.detail) == ("fail", f"{tmp_path / 'node.key'} is not a file")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the key file to another uid")
def test_key_owned_by_another_user_fails(data_dir):
    Identity.generate().save(data_dir / "node.key")
    os.chown(data_dir / "node.key", 4321, 4321)
    result = check_key(data_dir)
    assert result.status == "fail" and "uid 4321" in result.detail


def test_port_free_held_and_not_local():
    port = free_port()
    own, other = Identity.generate().peer_id, Identity.generate().peer_id
    assert check_port("grpc_listen", f"127.0.0.1:{port}", serving=None, own=own).status == "ok"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        held = check_port("grpc_listen", f"127.0.0.1:{port}", serving=None, own=own)
        assert held.status == "fail" and "grpc_listen" in held.fix
        assert check_port("grpc_listen", f"127.0.0.1:{port}", serving=own, own=own).status == "ok"
        taken = check_port("grpc_listen", f"127.0.0.1:{port}", serving=other, own=own)
        assert taken.status == "fail" and other in taken.detail and "--data-dir" in taken.fix
        assert check_port("grpc_listen", f"127.0.0.1:{port}", serving=other, own=None).status == "fail"
    # 192.0.2.0/24 is reserved for documentation: never an address of this machine; bind sends nothing.
    foreign = check_port("http_listen", "192.0.2.1:7441", serving=None, own=own)
    assert foreign.status == "fail" and "not an address of this machine" in foreign.detail


@pytest.fixture
def node_on_grpc_port(monkeypatch):
    """A gRPC server answering as a node does: SERVING, and capacity adverts signed by its own key
    (the other two ports free)."""
    servicer = _Peer()
    server, port = start_server([lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, s),
                                 lambda s: health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), s)],
                                tls=False)
    free_listens(monkeypatch)
    yield servicer.identity, port
    server.stop(grace=None)


# The server holds 127.0.0.1: a config wanting 0.0.0.0 cannot bind that port either while it runs.
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_ports_of_this_data_dirs_running_node_are_recognised(host, node_on_grpc_port, data_dir, monkeypatch,
                                                             capsys):
    identity, port = node_on_grpc_port
    identity.save(data_dir / "node.key")
    monkeypatch.setenv("DSPARK_GRPC_LISTEN", f"{host}:{port}")
    doctor(["--data-dir", str(data_dir), "--min-free-gb", "0"])
    assert f"[ok]   port grpc_listen: {host}:{port} is served by the running node" in capsys.readouterr().out


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
@pytest.mark.parametrize("key", ["another key", "no key yet"])
def test_ports_held_by_a_node_of_another_data_dir_fail(key, host, node_on_grpc_port, data_dir, monkeypatch, capsys):
    identity, port = node_on_grpc_port
    if key == "another key":
        Identity.generate().save(data_dir / "node.key")
    monkeypatch.setenv("DSPARK_GRPC_LISTEN", f"{host}:{port}")
    assert doctor(["--data-dir", str(data_dir), "--min-free-gb", "0"]) == 1
    out = capsys.readouterr().out
    assert (f"[FAIL] port grpc_listen: {host}:{port} is held by another dspark node (peer ID {identity.peer_id}), "
            "not this data dir's") in out
    assert "served by the running node" not in out


def test_a_health_service_alone_is_not_taken_for_a_node(health_server, data_dir, monkeypatch, capsys):
    _, port, _ = health_server
    free_listens(monkeypatch)
    monkeypatch.setenv("DSPARK_GRPC_LISTEN", f"127.0.0.1:{port}")
    assert doctor(["--data-dir", str(data_dir), "--min-free-gb", "0"]) == 1
    assert f"[FAIL] port grpc_listen: 127.0.0.1:{port} is held by a program that is not a dspark node" in \
        capsys.readouterr().out


def test_multiaddr_ports():
    assert tcp_listen_of_multiaddr("/ip4/0.0.0.0/tcp/7442") == "0.0.0.0:7442"
    assert tcp_listen_of_multiaddr("/ip6/::/tcp/7442") == "[::]:7442"
    assert tcp_listen_of_multiaddr("/ip4/0.0.0.0/udp/7442/quic-v1") is None


def test_exposure_warnings():
    assert check_exposure(load_config())[0].status == "warn"  # loopback gRPC: no market client reaches it
    public_p2p = {"listen": ["/ip4/0.0.0.0/tcp/7442"], "announce_grpc": "203.0.113.7:31440"}
    public = load_config(overrides={"grpc_listen": "0.0.0.0:7440", "p2p": public_p2p})
    assert [c.status for c in check_exposure(public)] == ["ok"]
    unannounced = check_exposure(load_config(overrides={"grpc_listen": "0.0.0.0:7440",
                                                        "p2p": {"listen": ["/ip4/0.0.0.0/tcp/7442"]}}))
    assert unannounced[0].status == "warn" and "announce_grpc" in unannounced[0].fix
    open_dashboard = check_exposure(load_config(overrides={"grpc_listen": "0.0.0.0:7440", "http_listen": "0.0.0.0:7441",
                                                           "p2p": public_p2p}))
    assert open_dashboard[0].status == "fail" and "dashboard.token" in open_dashboard[0].fix


def test_public_grpc_with_loopback_p2p_warns_through_the_environment(data_dir, monkeypatch, capsys):
    """The reported case: gRPC exposed and announced, p2p.listen left on its loopback default."""
    free_listens(monkeypatch)
    monkeypatch.setenv("DSPARK_GRPC_LISTEN", f"0.0.0.0:{free_port()}")
    monkeypatch.setenv("DSPARK_P2P__ANNOUNCE_GRPC", "1.2.3.4:7440")
    monkeypatch.delenv("DSPARK_P2P__LISTEN")
    doctor(["--data-dir", str(data_dir), "--min-free-gb", "0"])
    out = capsys.readouterr().out
    assert "[warn] exposure p2p: p2p.listen /ip4/127.0.0.1/tcp/7442 is loopback only" in out
    assert "[p2p] listen" in out and "DSPARK_P2P__LISTEN" in out
    assert "[ok]   exposure:" not in out


@pytest.mark.parametrize("grpc_listen, announce, listen, warned", [
    ("0.0.0.0:7440", "203.0.113.7:7440", ["/ip4/127.0.0.1/tcp/7442", "/ip6/::1/tcp/7442"], True),
    ("127.0.0.1:7440", "203.0.113.7:7440", ["/ip4/127.0.0.1/udp/7442/quic-v1"], True),    # announced publicly
    ("0.0.0.0:7440", "203.0.113.7:7440", ["/ip4/127.0.0.1/tcp/7442", "/ip4/0.0.0.0/tcp/7443"], False),
    ("0.0.0.0:7440", "203.0.113.7:7440", [], False),                    # no peer network at all: nothing to see
    ("127.0.0.1:7440", None, ["/ip4/127.0.0.1/tcp/7442"], False),       # a node for this machine only
])
def test_p2p_exposure(grpc_listen, announce, listen, warned):
    config = load_config(overrides={"grpc_listen": grpc_listen, "p2p": {"listen": listen, "announce_grpc": announce}})
    p2p = [check for check in check_exposure(config) if check.name == "exposure p2p"]
    assert bool(p2p) == warned
    if warned:
        assert p2p[0].status == "warn" and "DSPARK_P2P__LISTEN" in p2p[0].fix


def test_disk_threshold(tmp_path):
    assert check_disk("data_dir", tmp_path / "not" / "yet", 0).status == "ok"
    assert check_disk("data_dir", tmp_path, 1 << 62).status == "fail"


def test_disk_of_a_data_dir_that_is_a_file_fails(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("")
    for path in (tmp_path / "afile", tmp_path / "afile" / "below"):
        result = check_disk("data_dir", path, 0)
        assert result.status == "fail" and f"{tmp_path / 'afile'} is a file, not a directory" in result.detail
    free_listens(monkeypatch)
    assert doctor(["--data-dir", str(tmp_path / "afile"), "--min-free-gb", "0"]) == 1
    assert "[FAIL] disk data_dir:" in capsys.readouterr().out


class _Peer(worker_pb2_grpc.WorkerServicer):
    """A peer whose GetCapacity returns an advert stamped now + `offset_s` (payload corrupted if `tamper`)."""

    def __init__(self):
        self.identity = Identity.generate()
        self.offset_s = 0.0
        self.tamper = False

    def GetCapacity(self, request, context):
        advert = advert_pb2.CapacityAdvert(peer_id=self.identity.peer_id,
                                           issued_at_ms=int((time.time() + self.offset_s) * 1000))
        envelope = seal(self.identity, advert)
        if self.tamper:
            envelope.payload = envelope.payload + b"\x00"
        return envelope


@pytest.fixture(scope="module", params=[False, True], ids=["plaintext", "tls"])
def peer(request):
    servicer = _Peer()
    server, port = start_server([lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, s)],
                                tls=request.param)
    yield servicer, parse_endpoint(f"127.0.0.1:{port}")
    server.stop(grace=None)


def test_clock_in_sync(peer):
    servicer, endpoint = peer
    servicer.offset_s, servicer.tamper = 0.0, False
    result = check_clock(endpoint, "auto", max_skew_s=5)
    assert result.status == "ok", result.detail


@pytest.mark.parametrize("offset", [-120.0, 90.0])
def test_clock_skew_beyond_tolerance_fails(peer, offset):
    servicer, endpoint = peer
    servicer.offset_s, servicer.tamper = offset, False
    result = check_clock(endpoint, "auto", max_skew_s=30)
    assert result.status == "fail" and "NTP" in result.fix
    measured = float(result.detail.split("this clock is ")[1].split(" s off")[0])
    assert abs(measured - (-offset)) < 2  # the peer is ahead by `offset`: this clock is behind by it


def test_clock_refuses_a_badly_signed_advert(peer):
    servicer, endpoint = peer
    servicer.offset_s, servicer.tamper = 0.0, True
    result = check_clock(endpoint, "auto", max_skew_s=30)
    assert result.status == "fail" and "signature" in result.detail


def test_clock_without_peer_is_skipped_with_advice():
    result = check_clock(None, "auto", max_skew_s=30)
    assert result.status == "skip" and "--peer" in result.fix


def test_clock_peer_that_is_not_a_node(health_server):
    _, port, _ = health_server
    result = check_clock(parse_endpoint(f"127.0.0.1:{port}"), "auto", max_skew_s=30)
    assert result.status == "fail" and "is it a dspark node" in result.detail
