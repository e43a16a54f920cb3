"""Helpers for the deployment tests: real gRPC servers on loopback, plaintext and TLS."""

from __future__ import annotations

import argparse
import datetime
import socket
from concurrent import futures

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


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
