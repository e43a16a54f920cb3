"""gRPC channels for diagnostics (`health`, `doctor`): reach a node whatever its transport.

A node serves plaintext on loopback and TLS with a self-signed certificate elsewhere (tls.mode
"auto"), and a container's HEALTHCHECK reaches a node bound to 0.0.0.0 through 127.0.0.1, so
the probe cannot know in advance which one it will meet. With tls="auto" it asks the endpoint
for a certificate first and pins whatever it presents. That proves nothing about who answers,
which is fine for a liveness probe or a clock reading whose advert is verified by signature;
the client SDK, which sends jobs, binds the certificate to the peer ID instead.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from typing import Literal

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

TlsMode = Literal["auto", "on", "off"]


class ProbeError(Exception):
    """The endpoint could not be reached or spoke something else; the message says what to check."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """`HOST:PORT` or `[IPV6]:PORT`; refuses anything else with a message naming the problem."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:7440")
    # isascii: str.isdigit() also takes '²' (which int() refuses) and '٣' (which int() reads as 3).
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} in {text!r} is not a number from 1 to 65535")
    return Endpoint(host, int(port_text))


def endpoint_certificate(endpoint: Endpoint, timeout: float) -> bytes | None:
    """The PEM certificate the endpoint presents, or None if it does not speak TLS."""
    context = ssl.create_default_context()
    # Reading the certificate is the point: nothing is trusted yet.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=endpoint.host) as tls:
                der = tls.getpeercert(binary_form=True)
    except ssl.SSLError:
        return None
    except OSError as exc:
        raise ProbeError(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None
    return ssl.DER_cert_to_PEM_cert(der).encode() if der else None


def certificate_name(pem: bytes) -> str:
    """A name the certificate is valid for, for gRPC's hostname check against a pinned certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        if names:
            return names[0]
        addresses = san.get_values_for_type(x509.IPAddress)
        if addresses:
            return str(addresses[0])
    except x509.ExtensionNotFound:
        pass
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not common_names:
        raise ProbeError("the endpoint's certificate names no host (no SAN, no CN)")
    value = common_names[0].value
    return value.decode() if isinstance(value, bytes) else value


def open_channel(endpoint: Endpoint, tls: TlsMode, timeout: float) -> grpc.Channel:
    """A blocking channel to `endpoint`: plaintext, or TLS pinned to the certificate it presents."""
    if tls == "off":
        return grpc.insecure_channel(str(endpoint))
    pem = endpoint_certificate(endpoint, timeout)
    if pem is None:
        if tls == "on":
            raise ProbeError(f"{endpoint} does not speak TLS (use --tls off or auto)")
        return grpc.insecure_channel(str(endpoint))
    credentials = grpc.ssl_channel_credentials(root_certificates=pem)
    options = [("grpc.ssl_target_name_override", certificate_name(pem))]
    return grpc.secure_channel(str(endpoint), credentials, options=options)


def describe_rpc_error(endpoint: Endpoint, exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{endpoint} did not answer in time"
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"{endpoint} is unavailable ({details})"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"{endpoint} does not serve this RPC: is it a dspark node?"
    return f"{endpoint} answered {code.name if code else 'an error'}: {details}"


def health_status(endpoint: Endpoint, tls: TlsMode, timeout: float, service: str = "") -> str:
    """The standard health service's answer ("SERVING", "NOT_SERVING", ...); raises ProbeError or
    grpc.RpcError when there is no answer."""
    with open_channel(endpoint, tls, timeout) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
