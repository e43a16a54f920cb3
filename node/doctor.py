"""The checks behind `dspark-node doctor`: the environment an operator brings, each check returning
what it found and, when something is wrong, the one thing to do about it.

No check raises for a bad environment: that is what they report. They read, connect and bind
briefly; none writes outside a temporary socket.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc

from dspark.v1 import advert_pb2, worker_pb2, worker_pb2_grpc
from node.config import NodeConfig, is_loopback, split_host_port
from node.envelope import EnvelopeError, open_envelope
from node.gpu import GpuReport
from node.identity import Identity, IdentityError, peer_id_from_public_key
from node.ledger_schema import LEDGER_FILE
from node.probe import Endpoint, ProbeError, TlsMode, describe_rpc_error, open_channel

Status = Literal["ok", "warn", "fail", "skip"]
KEY_FILE = "node.key"


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def check_gpu(report: GpuReport, device: str, require_gpu: bool) -> Check:
    if report.usable:
        return Check("gpu", "ok", report.summary())
    needed = require_gpu or device.startswith("cuda")
    why = f"engine.device is {device!r}" if device.startswith("cuda") else "--require-gpu was given"
    fix = ("start the container with GPUs (docker run --gpus all / nvidia.com/gpu in Kubernetes), "
           "install the NVIDIA driver, or install a CUDA build of torch")
    if needed:
        return Check("gpu", "fail", f"no GPU ({why}): {report.reason}", fix)
    return Check("gpu", "warn", f"no GPU: {report.reason}; the node will serve on CPU, slowly", fix)


def check_cuda(report: GpuReport) -> Check:
    """Run one small matmul per device and compare it with the CPU: catches a driver too old for
    the torch build and a GPU newer than the wheel's kernels ("no kernel image is available")."""
    if not report.usable:
        return Check("cuda", "skip", "no usable GPU to run CUDA on")
    import torch
    a = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    expected = a @ a
    for device in report.devices:
        try:
            got = (a.to(f"cuda:{device.index}") @ a.to(f"cuda:{device.index}")).cpu()
            torch.cuda.synchronize(device.index)
        except RuntimeError as exc:
            return Check("cuda", "fail", f"cuda:{device.index} ({device.name}) cannot run a matmul: {exc}",
                         "install a torch build whose CUDA version the driver supports (see `nvidia-smi`)")
        if not torch.allclose(got, expected, rtol=1e-2, atol=1e-2):
            return Check("cuda", "fail", f"cuda:{device.index} ({device.name}) computes a wrong matmul",
                         "the GPU or its driver is faulty: ask the provider for another machine")
    return Check("cuda", "ok", f"a matmul runs correctly on {len(report.devices)} device(s)")


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) as the node's servers bind (SO_REUSEADDR); OSError when
    it cannot be."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _bind_error(host: str, port: int) -> OSError | None:
    try:
        bound_socket(host, port).close()
    except OSError as exc:
        return exc
    return None


def _reachable(host: str, port: int, timeout: float) -> bool:
    # A wildcard listener is reached from inside through loopback.
    target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        socket.create_connection((target, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def node_peer_id(endpoint: Endpoint, tls: TlsMode, timeout: float) -> str | None:
    """The peer ID of the dspark node answering at `endpoint`: the key that signed its capacity advert
    (signature checked). None when what answers there is not a node."""
    try:
        with open_channel(endpoint, tls, timeout) as channel:
            envelope = worker_pb2_grpc.WorkerStub(channel).GetCapacity(worker_pb2.GetCapacityRequest(),
                                                                       timeout=timeout)
        open_envelope(envelope, advert_pb2.CapacityAdvert)
    except (ProbeError, EnvelopeError, grpc.RpcError):
        return None
    return peer_id_from_public_key(envelope.public_key)


def data_dir_peer_id(data_dir: Path) -> str | None:
    """The peer ID of the key in `data_dir`; None when there is no usable key (check_key says why):
    then no node runs from this data dir, as `run` refuses such a key."""
    try:
        return Identity.load(data_dir / KEY_FILE).peer_id
    except IdentityError:
        return None


def _held_port(field: str, listen: str, serving: str | None, own: str | None) -> Check:
    # The peer ID decides, not the address the node holds: this data dir's node on 127.0.0.1 frees
    # the port for a config now wanting 0.0.0.0 when it restarts with it (one key, one ledger: it never
    # runs twice), while another data dir's node keeps it, on whichever address, and `run` fails.
    if serving is None:
        return Check(f"port {field}", "fail", f"{listen} is held by a program that is not a dspark node "
                     "(no signed capacity advert on the gRPC port)",
                     f"stop what holds the port or change {field}; if the node is just starting, "
                     "rerun doctor in a minute")
    if serving != own:
        return Check(f"port {field}", "fail", f"{listen} is held by another dspark node (peer ID {serving}), "
                     "not this data dir's",
                     f"stop that node or change {field}; if it is the node meant, pass its --data-dir")
    return Check(f"port {field}", "ok", f"{listen} is served by the running node and reachable from inside")


def check_port(field: str, listen: str, serving: str | None, own: str | None, timeout: float = 1.0) -> Check:
    """`listen` (HOST:PORT) can be bound, or is already served from here by this data dir's node.

    `serving` is the peer ID of the node answering on the config's gRPC port (None: no node answers),
    `own` that of the data dir's key (None: none yet); a port in use is taken to be held by the node
    that holds the gRPC port."""
    host, port = split_host_port(listen)
    error = _bind_error(host, port)
    if error is None:
        return Check(f"port {field}", "ok", f"{listen} is free")
    if error.errno == errno.EADDRINUSE:
        if _reachable(host, port, timeout):
            return _held_port(field, listen, serving, own)
        return Check(f"port {field}", "fail", f"{listen} is in use but does not accept connections",
                     f"stop what holds the port or change {field}")
    if error.errno == errno.EADDRNOTAVAIL:
        return Check(f"port {field}", "fail", f"{host} is not an address of this machine",
                     f"set {field} to 0.0.0.0:{port} (all interfaces) or one of this machine's addresses")
    if error.errno == errno.EACCES:
        return Check(f"port {field}", "fail", f"no permission to bind {listen}",
                     f"use a port above 1023 in {field}")
    return Check(f"port {field}", "fail", f"cannot bind {listen}: {error.strerror}", f"change {field}")


def tcp_listen_of_multiaddr(addr: str) -> str | None:
    """`/ip4/H/tcp/P` or `/ip6/H/tcp/P` -> `H:P`; None for other transports (nothing to bind-test)."""
    parts = addr.strip("/").split("/")
    if len(parts) >= 4 and parts[0] in ("ip4", "ip6") and parts[2] == "tcp" and parts[3].isdigit():
        return f"[{parts[1]}]:{parts[3]}" if parts[0] == "ip6" else f"{parts[1]}:{parts[3]}"
    return None


def _loopback_multiaddr(addr: str) -> bool:
    parts = addr.strip("/").split("/")
    return len(parts) >= 2 and parts[0] in ("ip4", "ip6") and is_loopback(parts[1])


def _on_all_interfaces(addr: str) -> str:
    """`/ip4/127.0.0.1/tcp/P` -> `/ip4/0.0.0.0/tcp/P` (`/ip6/::/...` for IPv6): the fix to suggest."""
    parts = addr.strip("/").split("/")
    return "/" + "/".join([parts[0], "::" if parts[0] == "ip6" else "0.0.0.0", *parts[2:]])


def _check_p2p_exposure(config: NodeConfig) -> Check | None:
    """A node serving the market whose adverts no peer elsewhere can receive: clients never find it."""
    listen = config.p2p.listen
    announced = config.p2p.announce_grpc
    public = (not is_loopback(split_host_port(config.grpc_listen)[0])
              or announced is not None and not is_loopback(split_host_port(announced)[0]))
    # No listen address at all is a node run without the peer network on purpose.
    if not (public and listen and all(map(_loopback_multiaddr, listen))):
        return None
    return Check("exposure p2p", "warn", f"p2p.listen {' '.join(listen)} is loopback only: peers on other "
                 "machines never receive this node's adverts, so no client finds it",
                 f"set [p2p] listen = [\"{_on_all_interfaces(listen[0])}\"] (DSPARK_P2P__LISTEN) "
                 "and let peers reach that port")


def check_exposure(config: NodeConfig) -> list[Check]:
    """Settings under which clients and peers outside this machine cannot reach the node."""
    checks = []
    grpc_host, grpc_port = split_host_port(config.grpc_listen)
    if is_loopback(grpc_host):
        checks.append(Check("exposure grpc", "warn", f"grpc_listen {config.grpc_listen} is loopback: "
                            "clients on other machines cannot submit jobs",
                            f"set grpc_listen = \"0.0.0.0:{grpc_port}\" (DSPARK_GRPC_LISTEN) to serve the market"))
    elif grpc_host in ("0.0.0.0", "::") and not config.p2p.announce_grpc and config.p2p.listen:
        checks.append(Check("exposure grpc", "warn", "adverts would announce a wildcard address "
                            f"({config.grpc_listen}) that clients cannot dial",
                            "set p2p.announce_grpc to the public HOST:PORT the provider forwards to "
                            "this port (DSPARK_P2P__ANNOUNCE_GRPC)"))
    p2p = _check_p2p_exposure(config)
    if p2p is not None:
        checks.append(p2p)
    http_host, _ = split_host_port(config.http_listen)
    if not is_loopback(http_host) and not config.dashboard.token:
        checks.append(Check("exposure http", "fail", f"http_listen {config.http_listen} is not loopback "
                            "and no dashboard token is set: anyone could read the dashboard",
                            "set dashboard.token (DSPARK_DASHBOARD__TOKEN) or keep http_listen on 127.0.0.1"))
    if checks:
        return checks
    return [Check("exposure", "ok", f"gRPC {config.grpc_listen}, HTTP {config.http_listen}")]


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(label: str, path: Path, min_free_bytes: int) -> Check:
    """Free space where `path` is (or will be created): models are converted and cached there."""
    where = _existing_ancestor(path)
    if not where.is_dir():     # the free space of the file's disk would pass a path `run` refuses
        return Check(f"disk {label}", "fail", f"{where} is a file, not a directory ({path})",
                     "move the file away, or point the path at a directory")
    free = shutil.disk_usage(where).free
    gib = free / 2**30
    if free < min_free_bytes:
        return Check(f"disk {label}", "fail", f"{gib:.1f} GiB free at {where} ({path}), "
                     f"under the {min_free_bytes / 2**30:.0f} GiB wanted",
                     "free space, mount a larger volume there, or point the path elsewhere")
    return Check(f"disk {label}", "ok", f"{gib:.1f} GiB free at {where} ({path})")


def check_key(data_dir: Path) -> Check:
    path = data_dir / KEY_FILE
    where = _existing_ancestor(data_dir)
    if not where.is_dir():     # what `run` refuses at start
        return Check("key", "fail", f"data_dir {data_dir} cannot hold the key: {where} is a file, not a directory",
                     "give a directory (--data-dir, data_dir)")
    if path.is_symlink() and not path.exists():     # `run` cannot create the key through it either
        return Check("key", "fail", f"{path} is a link to {os.readlink(path)}, which does not exist",
                     "restore the key it pointed to (a mounted secret?), or remove the link to make a new key")
    if not path.exists():
        if (data_dir / LEDGER_FILE).exists():      # what `run` refuses: the key was lost, not never made
            return Check("key", "fail", f"{path} is missing, but {data_dir / LEDGER_FILE} holds the receipts it "
                         "signed", "restore the key from backup (a new key would be a new node)")
        if not os.access(where, os.W_OK):
            return Check("key", "fail", f"no key yet, and {where} is not writable by uid {os.geteuid()}",
                         "chown the data dir to the node's user, or pass --data-dir to a writable one")
        return Check("key", "ok", f"no key yet at {path}: one is created (mode 0600) on first start")
    if not path.is_file():     # a directory's mode would read as "others can read the key"
        return Check("key", "fail", f"{path} is not a file", "move it away: the node creates its key there")
    info = path.stat()
    if info.st_uid != os.geteuid():
        return Check("key", "fail", f"{path} is owned by uid {info.st_uid}, the node runs as uid {os.geteuid()}",
                     f"chown {os.geteuid()} {path}")
    if stat.S_IMODE(info.st_mode) & 0o077:
        return Check("key", "fail", f"{path} has mode {stat.S_IMODE(info.st_mode):o}: others can read the "
                     "node's signing key", f"chmod 600 {path}")
    try:
        identity = Identity.load(path)
    except IdentityError as exc:
        return Check("key", "fail", str(exc), "restore the key from backup; a new key is a new node "
                     "(receipts signed by the old one stay valid)")
    return Check("key", "ok", f"{path} (mode 600), peer ID {identity.peer_id}")


def check_clock(peer: Endpoint | None, tls: TlsMode, max_skew_s: float, timeout: float = 3.0) -> Check:
    """Compare this clock with a peer's: jobs carry issued_at / expires_at, adverts a time to live,
    and a node whose clock is off refuses good jobs or publishes adverts peers drop."""
    if peer is None:
        return Check("clock", "skip", "no peer to compare with",
                     "pass --peer HOST:PORT of another node (its gRPC endpoint) to measure clock skew")
    try:
        with open_channel(peer, tls, timeout) as channel:
            sent = time.time()
            envelope = worker_pb2_grpc.WorkerStub(channel).GetCapacity(worker_pb2.GetCapacityRequest(),
                                                                       timeout=timeout)
            received = time.time()
        advert = open_envelope(envelope, advert_pb2.CapacityAdvert)
    except (ProbeError, EnvelopeError) as exc:
        return Check("clock", "fail", f"cannot read {peer}'s clock: {exc}", "check the --peer endpoint")
    except grpc.RpcError as exc:
        return Check("clock", "fail", f"cannot read {peer}'s clock: {describe_rpc_error(peer, exc)}",
                     "check the --peer endpoint")
    if advert.issued_at_ms <= 0:
        return Check("clock", "fail", f"{peer}'s capacity advert carries no issued_at time",
                     "compare with another peer")
    # The peer stamped its advert somewhere between `sent` and `received`: assume the middle.
    skew = advert.issued_at_ms / 1000 - (sent + received) / 2
    bound = (received - sent) / 2
    detail = f"this clock is {-skew:+.2f} s off {peer} (+-{bound:.2f} s, plus the advert's age)"
    if abs(skew) > max_skew_s:
        return Check("clock", "fail", f"{detail}, over the {max_skew_s:g} s jobs tolerate",
                     "synchronise the clock with NTP (timedatectl set-ntp true, or chrony)")
    return Check("clock", "ok", detail)
