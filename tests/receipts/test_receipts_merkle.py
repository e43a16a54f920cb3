"""Merkle roots and inclusion proofs (RFC 6962 hashing): they verify, and fail when anything is altered."""

from __future__ import annotations

import hashlib

import pytest

from node.merkle import RootBuilder, inclusion_proof, merkle_root, verify_inclusion


def leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]


def reference_root(items: list[bytes]) -> bytes:
    """RFC 6962 section 2.1 written out independently: hash leaves, then pair levels bottom-up,
    promoting a level's odd last node unchanged (equivalent to the split-at-power-of-two rule)."""
    if not items:
        return hashlib.sha256(b"").digest()
    level = [hashlib.sha256(b"\x00" + d).digest() for d in items]
    while len(level) > 1:
        pairs = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
    return level[0]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33])
def test_root_matches_the_rfc6962_definition(n):
    assert merkle_root(leaves(n)) == reference_root(leaves(n))


def test_a_root_built_leaf_by_leaf_is_the_root_of_all_the_leaves():
    builder, items = RootBuilder(), leaves(70)
    assert builder.root() == merkle_root([])
    for n, leaf in enumerate(items, 1):
        builder.add(leaf)
        assert (builder.size, builder.root()) == (n, reference_root(items[:n]))


def test_every_leaf_of_every_small_tree_has_a_proof_that_verifies():
    for n in range(1, 34):
        items = leaves(n)
        root = merkle_root(items)
        for i in range(n):
            proof = inclusion_proof(items, i)
            assert proof.root == root
            assert verify_inclusion(items[i], i, n, proof.path, root), (n, i)


def test_altered_proofs_fail():
    items = leaves(13)
    proof = inclusion_proof(items, 6)
    good = (proof.leaf, proof.leaf_index, proof.tree_size, list(proof.path), proof.root)
    assert verify_inclusion(*good)
    flipped = bytes([proof.path[1][0] ^ 1]) + proof.path[1][1:]
    altered = {
        "other leaf": (items[7], 6, 13, list(proof.path), proof.root),
        "other index": (proof.leaf, 7, 13, list(proof.path), proof.root),
        # (a size with the same path shape, e.g. 14, also verifies: the root does not commit to the
        # size, which is why a period record publishes both)
        "other size": (proof.leaf, 6, 7, list(proof.path), proof.root),
        "index past size": (proof.leaf, 13, 13, list(proof.path), proof.root),
        "flipped sibling": (proof.leaf, 6, 13, [proof.path[0], flipped, *proof.path[2:]], proof.root),
        "short path": (proof.leaf, 6, 13, list(proof.path[:-1]), proof.root),
        "long path": (proof.leaf, 6, 13, [*proof.path, proof.path[0]], proof.root),
        "swapped siblings": (proof.leaf, 6, 13, [proof.path[1], proof.path[0], *proof.path[2:]], proof.root),
        "other root": (proof.leaf, 6, 13, list(proof.path), merkle_root(items[:-1])),
    }
    for name, args in altered.items():
        assert not verify_inclusion(*args), name


def test_a_leaf_cannot_pass_for_an_inner_node():
    items = leaves(4)
    inner = hashlib.sha256(b"\x01" + hashlib.sha256(b"\x00" + items[0]).digest()
                           + hashlib.sha256(b"\x00" + items[1]).digest()).digest()
    # Without the 0x00/0x01 prefixes, a two-leaf tree over (inner, right half) would share the root.
    assert merkle_root([inner, merkle_root(items[2:])]) != merkle_root(items)


def test_proof_index_outside_the_tree_is_refused():
    with pytest.raises(IndexError, match="outside a tree of 3"):
        inclusion_proof(leaves(3), 3)
