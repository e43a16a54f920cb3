"""Signed envelopes (design doc, "Signed envelopes"): sign the exact payload bytes under a
domain-separated, length-prefixed encoding (DSSE's PAE), verify before parsing anything else."""

from __future__ import annotations

import hashlib
import struct
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from dspark.v1.envelope_pb2 import Envelope
from node.identity import Identity, verify_signature

DOMAIN = b"dspark/v1"
MAX_PAYLOAD_BYTES = 1 << 20  # a job with a 1 MiB prompt is already far past any context we serve
QUOTED_CHARS = 64            # what a refusal shows of a peer's string: enough to recognise it

M = TypeVar("M", bound=Message)


class EnvelopeError(ValueError):
    """An envelope that must be refused; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def quoted(text: str) -> str:
    """A peer's string as a refusal quotes it: repr'd, cut to QUOTED_CHARS (and its length given) when
    longer. Quoted whole, a string of 16 KiB or more passes gRPC's limit on the status message: the
    peer gets RESOURCE_EXHAUSTED instead of the refusal, and the node's problem log keeps megabytes."""
    if len(text) <= QUOTED_CHARS:
        return repr(text)
    return f"{text[:QUOTED_CHARS]!r}... ({len(text)} characters)"


def pae(payload_type: str, payload: bytes) -> bytes:
    type_bytes = payload_type.encode()
    return (DOMAIN + struct.pack("<Q", len(type_bytes)) + type_bytes
            + struct.pack("<Q", len(payload)) + payload)


def type_name(message_class: type[Message]) -> str:
    return message_class.DESCRIPTOR.full_name


def seal(identity: Identity, message: Message) -> Envelope:
    payload = message.SerializeToString(deterministic=True)
    payload_type = type_name(type(message))
    return Envelope(payload_type=payload_type, payload=payload, public_key=identity.public_key,
                    signature=identity.sign(pae(payload_type, payload)))


def open_envelope(envelope: Envelope, message_class: type[M], max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> M:
    """Check type, size and signature of `envelope`, then parse its payload as `message_class`."""
    expected = type_name(message_class)
    if envelope.payload_type != expected:
        raise EnvelopeError("wrong_type", f"envelope carries {quoted(envelope.payload_type)}, expected {expected!r}")
    if len(envelope.payload) > max_payload_bytes:
        raise EnvelopeError("too_large", f"payload of {len(envelope.payload)} bytes exceeds {max_payload_bytes}")
    if len(envelope.public_key) != 32:
        raise EnvelopeError("bad_key", f"public key must be 32 bytes, got {len(envelope.public_key)}")
    if len(envelope.signature) != 64:
        raise EnvelopeError("bad_signature", f"signature must be 64 bytes, got {len(envelope.signature)}")
    if not verify_signature(envelope.public_key, envelope.signature, pae(envelope.payload_type, envelope.payload)):
        raise EnvelopeError("bad_signature", "signature does not verify for the given public key")
    message = message_class()
    try:
        message.ParseFromString(envelope.payload)
    except DecodeError as exc:
        raise EnvelopeError("malformed", f"payload is not a valid {expected}: {exc}") from None
    return message


def digest(envelope: Envelope) -> bytes:
    """sha256 of the envelope's deterministic serialization (receipts chain and jobs are keyed by it)."""
    return hashlib.sha256(envelope.SerializeToString(deterministic=True)).digest()
