"""The gRPC port's TLS certificate and its binding to the node's peer ID.

gRPC's TLS (BoringSSL) refuses Ed25519 certificates in the handshake (measured: "no common
signature algorithms"), so the certificate cannot carry the node key itself. Instead the node keeps
a self-signed ECDSA P-256 certificate in `<data_dir>/tls/` and signs its sha256 fingerprint into
every CapacityAdvert (`tls_cert_sha256`). A client fetches the certificate, pins it as the only
trusted root for the channel, and checks that the advert signed by the expected peer ID names that
fingerprint before it sends a job (node/client.py).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# The certificate's DNS name; clients override the target name to it, since a node is dialled by IP.
SERVER_NAME = "dspark-node"
_VALIDITY = datetime.timedelta(days=365)
_RENEW_BEFORE = datetime.timedelta(days=7)


class TlsError(ValueError):
    """Certificate material that cannot be used, or a peer whose certificate is not bound to it."""


@dataclass(frozen=True)
class TlsMaterial:
    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.cert_pem)


def fingerprint(cert_pem: bytes) -> bytes:
    """sha256 of the certificate's DER encoding (what CapacityAdvert.tls_cert_sha256 carries)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise TlsError(f"not a PEM certificate: {exc}") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def _make(peer_id: str) -> TlsMaterial:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + _VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            # Self-signed and pinned as the client's root, so it must be usable as a CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return TlsMaterial(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _usable(material: TlsMaterial, peer_id: str) -> bool:
    cert = x509.load_pem_x509_certificate(material.cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    fresh = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) > _RENEW_BEFORE
    return fresh and bool(names) and names[0].value == peer_id


def load_or_create(tls_dir: Path, peer_id: str) -> TlsMaterial:
    """The node's certificate, made (or renewed near expiry, or after a key change) as needed."""
    try:
        return _load_or_create(tls_dir, peer_id)
    except OSError as exc:     # `tls` is a file, `cert.pem` a directory, a file this user may not read
        raise TlsError(f"cannot use {exc.filename} ({exc.strerror}); the node keeps its TLS certificate in "
                       f"the directory {tls_dir}") from None


def _load_or_create(tls_dir: Path, peer_id: str) -> TlsMaterial:
    cert_path, key_path = tls_dir / "cert.pem", tls_dir / "key.pem"
    if cert_path.exists() and key_path.exists():
        try:
            material = TlsMaterial(cert_path.read_bytes(), key_path.read_bytes())
            if _usable(material, peer_id):
                return material
        except ValueError as exc:
            raise TlsError(f"{cert_path} is not a usable certificate ({exc}); delete {tls_dir} to regenerate") from None
    material = _make(peer_id)
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Key first, each written to a temporary name and renamed, so a crash never leaves a pair
    # whose halves do not match.
    for path, data, mode in ((key_path, material.key_pem, 0o600), (cert_path, material.cert_pem, 0o644)):
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return material


def fetch_server_cert(host: str, port: int, timeout_s: float = 10.0) -> bytes:
    """The certificate a TLS server presents (blocking; not trusted until its fingerprint is checked)."""
    try:
        return ssl.get_server_certificate((host, port), timeout=timeout_s).encode()
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot fetch the TLS certificate of {host}:{port}: {exc}") from None
