"""Merkle tree over a billing period's receipt digests, with inclusion proofs.

The hashing rule is RFC 6962 / RFC 9162 (Certificate Transparency), with SHA-256:

    leaf_hash(d)      = SHA256(0x00 || d)          d = the 32-byte receipt digest
                                                    (sha256 of the receipt Envelope bytes)
    node_hash(l, r)   = SHA256(0x01 || l || r)
    MTH([])           = SHA256("")
    MTH([d])          = leaf_hash(d)
    MTH(D[0:n])       = node_hash(MTH(D[0:k]), MTH(D[k:n]))   k = largest power of two < n

Leaves are the period's receipts in ledger sequence order. The 0x00 / 0x01 prefixes keep a leaf
from being passed off as an inner node (second-preimage attack). An inclusion proof is RFC 6962's
audit path (sibling hashes from the leaf upwards); `verify_inclusion` is RFC 9162 section 2.1.3.2,
which a settlement contract can port line by line (Solidity has `sha256`). As in Certificate
Transparency, a root does not commit to its tree size by itself: publish (root, tree size) together,
as the export's period record does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

_LEAF = b"\x00"
_NODE = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly less than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _root_of_hashes(hashes: Sequence[bytes]) -> bytes:
    n = len(hashes)
    if n == 1:
        return hashes[0]
    k = _split(n)
    return node_hash(_root_of_hashes(hashes[:k]), _root_of_hashes(hashes[k:]))


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return hashlib.sha256(b"").digest()
    return _root_of_hashes([leaf_hash(d) for d in leaves])


class RootBuilder:
    """`merkle_root` of leaves added one by one, in O(log n) memory: an export of a long period
    streams its receipts and never holds their digests. Holds the roots of the perfect subtrees
    the leaves so far make (sizes the binary digits of their count, largest first); the tree of
    n leaves is those subtrees joined from the right, as MTH's split at the largest power of two."""

    def __init__(self) -> None:
        self._subtrees: list[tuple[int, bytes]] = []    # (size, root)
        self.size = 0

    def add(self, leaf: bytes) -> None:
        size, node = 1, leaf_hash(leaf)
        while self._subtrees and self._subtrees[-1][0] == size:
            size, node = 2 * size, node_hash(self._subtrees.pop()[1], node)
        self._subtrees.append((size, node))
        self.size += 1

    def root(self) -> bytes:
        if not self._subtrees:
            return hashlib.sha256(b"").digest()
        node = self._subtrees[-1][1]
        for _, left in reversed(self._subtrees[:-1]):
            node = node_hash(left, node)
        return node


def _path(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    n = len(hashes)
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return _path(index, hashes[:k]) + [_root_of_hashes(hashes[k:])]
    return _path(index - k, hashes[k:]) + [_root_of_hashes(hashes[:k])]


@dataclass(frozen=True)
class InclusionProof:
    leaf_index: int
    tree_size: int
    leaf: bytes              # the receipt digest
    path: tuple[bytes, ...]  # sibling hashes, leaf level first
    root: bytes


def inclusion_proof(leaves: Sequence[bytes], index: int) -> InclusionProof:
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} is outside a tree of {len(leaves)} leaves")
    hashes = [leaf_hash(d) for d in leaves]
    return InclusionProof(leaf_index=index, tree_size=len(leaves), leaf=leaves[index],
                          path=tuple(_path(index, hashes)), root=_root_of_hashes(hashes))


def verify_inclusion(leaf: bytes, leaf_index: int, tree_size: int, path: Sequence[bytes],
                     root: bytes) -> bool:
    """RFC 9162 section 2.1.3.2: does `path` prove `leaf` sits at `leaf_index` under `root`?"""
    if not 0 <= leaf_index < tree_size:
        return False
    fn, sn = leaf_index, tree_size - 1
    r = leaf_hash(leaf)
    for p in path:
        if len(p) != 32 or sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root
