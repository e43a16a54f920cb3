"""The node's (or a client's) Ed25519 identity: one key file, and the libp2p peer ID derived from it.

The same key signs jobs / receipts / adverts and is the libp2p host key, so a signature by the node
is verifiable from its peer ID alone (the peer ID embeds the raw public key, identity multihash).
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# libp2p PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
_LIBP2P_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
# Multihash "identity" code 0x00 with length 36 (the 4-byte header + 32-byte key).
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, 0x24])
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_KEY_FILE_HEADER = "dspark-node ed25519 key v1\n"


PEER_ID_CHARS = 52     # base58 of the identity multihash of a libp2p Ed25519 key: "12D3KooW" + 44


class IdentityError(ValueError):
    """A key file or a peer ID that cannot be used; the message says why."""


def _b58encode(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, rem = divmod(n, 58)
        out = _B58_ALPHABET[rem] + out
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + out


def _b58decode(text: str) -> bytes:
    n = 0
    for ch in text:
        idx = _B58_ALPHABET.find(ch)
        if idx < 0:
            raise IdentityError(f"peer ID contains {ch!r}, which is not base58")
        n = n * 58 + idx
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(text) - len(text.lstrip("1"))
    return b"\0" * pad + body


def peer_id_from_public_key(public_key: bytes) -> str:
    """libp2p peer ID (base58 identity multihash, `12D3KooW...`) of a raw Ed25519 public key."""
    if len(public_key) != 32:
        raise IdentityError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    return _b58encode(_IDENTITY_MULTIHASH_PREFIX + _LIBP2P_ED25519_PREFIX + public_key)


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of `peer_id_from_public_key`; refuses peer IDs that do not embed an Ed25519 key."""
    # Checked before decoding: base58 decoding is quadratic in the length, and a peer's advert may
    # carry a 16,000-character peer ID (60 ms each, on the libp2p thread, before this check).
    if len(peer_id) > PEER_ID_CHARS:
        raise IdentityError(f"{peer_id[:PEER_ID_CHARS]!r}... is not a peer ID of an Ed25519 key "
                            f"({PEER_ID_CHARS} characters, not {len(peer_id)})")
    raw = _b58decode(peer_id)
    header = _IDENTITY_MULTIHASH_PREFIX + _LIBP2P_ED25519_PREFIX
    if len(raw) != len(header) + 32 or not raw.startswith(header):
        raise IdentityError(f"{peer_id!r} is not a peer ID of an Ed25519 key")
    return raw[len(header):]


# The Ed25519 public keys of small order, as libsodium lists them (its ge25519_has_small_order): compared
# without the sign bit, and with y >= p, as OpenSSL takes them too. With R the identity point and S = 0
# a "signature" under such a key verifies for every message (order 1) or for one in 2, 4 or 8: anyone
# signs as it, so a job, receipt or acknowledgment under it binds no one.
_SMALL_ORDER = frozenset(bytes.fromhex(key) for key in (
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"))


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    if len(public_key) == 32 and public_key[:31] + bytes([public_key[31] & 0x7F]) in _SMALL_ORDER:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise IdentityError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed (libp2p builds its host key from it)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def save(self, path: Path) -> None:
        """Write the key with mode 0600, refusing to overwrite an existing key."""
        path.parent.mkdir(parents=True, exist_ok=True)
        text = _KEY_FILE_HEADER + base64.b64encode(self.seed).decode() + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise IdentityError(f"key file {path} does not exist") from None
        except OSError as exc:     # a directory, a file this user may not read
            raise IdentityError(f"key file {path} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise IdentityError(f"{path} is not a dspark-node key file (not text)") from None
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"key file {path} has mode {mode:o}; it must not be readable by others (chmod 600)"
            )
        if not text.startswith(_KEY_FILE_HEADER):
            raise IdentityError(f"{path} is not a dspark-node key file (bad header)")
        try:
            seed = base64.b64decode(text[len(_KEY_FILE_HEADER):].strip(), validate=True)
        except ValueError:
            raise IdentityError(f"key file {path} is corrupt (not base64)") from None
        try:
            return cls.from_seed(seed)
        except IdentityError as exc:
            raise IdentityError(f"key file {path} is corrupt ({exc})") from None

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        try:
            identity.save(path)
        except OSError as exc:     # a read-only dir, a dangling link where the key belongs
            raise IdentityError(f"key file {path} cannot be written: {exc.strerror}") from None
        return identity
