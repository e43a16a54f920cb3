"""Helpers for the deployment tests: real gRPC servers on loopback, plaintext and TLS."""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from node.config import NodeConfig, load_config


def parse_command(module, argv: list[str]) -> argparse.Namespace:
    """Parse `argv` with one subcommand module's own parser (as node/cli.py would)."""
    parser = argparse.ArgumentParser(prog="dspark-node")
    sub = parser.add_subparsers(dest="command", required=True)
    module.register(sub)
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed_certificate(name: str = "dspark-node") -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for `name`, self-signed, like a node's own TLS certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def start_server(servicers, tls: bool) -> tuple[grpc.Server, int]:
    """A real gRPC server on a free loopback port; `servicers` is a list of add_* callables."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    for add in servicers:
        add(server)
    port = free_port()
    address = f"127.0.0.1:{port}"
    if tls:
        server.add_secure_port(address, grpc.ssl_server_credentials([self_signed_certificate()]))
    else:
        server.add_insecure_port(address)
    server.start()
    return server, port


REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def tool(name: str, install_hint: str) -> str:
    """Path of a checker binary (from the venv's test extra or the system); skips, saying why, if absent.
    Tests never download: the hint says what CI installs."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found:
        return found
    reason = f"{name} not installed ({install_hint}); check skipped"
    print(reason)
    pytest.skip(reason)


def load_yaml_documents(path: Path) -> list[dict]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def env_pairs(entries: list[str]) -> dict[str, str]:
    """`NAME=value` strings (SDL, compose lists) -> dict."""
    return dict(entry.split("=", 1) for entry in entries)


def config_from_env(env: dict[str, str], monkeypatch) -> NodeConfig:
    """The NodeConfig a node started with exactly this DSPARK_* environment would use (raises
    ConfigError naming any bad field): proves a manifest's settings mean what it says."""
    for name in [n for n in os.environ if n.startswith("DSPARK_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_config()
