"""`linear` gives the plain product's numbers on either CPU path (one row: the transposed copy;
more rows: the oneDNN-packed copy), and the packed path's rows do not depend on the other rows in
the call. `attention` equals attention written out head by head, whatever the number of queries
a row has."""

import pytest
import torch

from kernels.ops import attention, linear, pack_linear


@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (3, 64), (1, 1, 64), (1, 8, 64), (4, 7, 64), (0, 64)])
def test_linear_equals_plain_product(shape):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2085, 64, generator=g)
    x = torch.randn(shape, generator=g)
    packed = pack_linear(weight)
    assert packed.packed is not None   # this CPU build has oneDNN
    out = linear(x, packed)
    assert out.shape == (*shape[:-1], weight.shape[0])
    torch.testing.assert_close(out, x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_packed_rows_are_batch_invariant():
    weight = pack_linear(torch.randn(3072, 576, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(2))
    pairs = torch.cat([linear(x[i:i + 2], weight) for i in range(0, 16, 2)])
    for rows in (3, 7, 16):
        assert torch.equal(linear(x[:rows], weight), pairs[:rows])


def test_weights_without_a_packed_layout_use_the_plain_product():
    bf16 = torch.randn(8, 4).bfloat16()
    weight = pack_linear(bf16)
    assert weight.packed is None and weight.w_t.data_ptr() == bf16.data_ptr()   # a view, no copy
    x = torch.ones(3, 4).bfloat16()
    assert torch.equal(linear(x, weight), x @ bf16.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4])
def test_linear_on_a_prefix_of_a_block_equals_the_product_of_its_copy(dtype, rows):
    # x[:, :k] has leading strides that do not chain: `linear` flattens it itself (kernels/ops.py)
    g = torch.Generator().manual_seed(3)
    weight = pack_linear(torch.randn(300, 64, generator=g).to(dtype))
    block = torch.randn(rows, 7, 64, generator=g).to(dtype)
    for k in (1, 2, 6):
        out = linear(block[:, :k], weight)
        assert out.shape == (rows, k, 300)
        assert torch.equal(out, linear(block[:, :k].clone(), weight))


def reference_attention(q, k, v, mask):
    """Head h of q against K/V head h // (nh / nkv), one (row, head) at a time, in fp64."""
    R, Q, nh, hd = q.shape
    g = nh // k.shape[2]
    out = torch.empty(R, Q, nh, hd, dtype=torch.float64)
    for r in range(R):
        for h in range(nh):
            scores = q[r, :, h].double() @ k[r, :, h // g].double().t() / hd ** 0.5
            if mask is not None:
                scores = scores.masked_fill(~mask[r], float("-inf"))
            out[r, :, h] = torch.softmax(scores, -1) @ v[r, :, h // g].double()
    return out


@pytest.mark.parametrize("rows,queries,heads,kv_heads", [
    (1, 1, 9, 3), (4, 1, 9, 3), (3, 2, 9, 3), (5, 7, 9, 3), (2, 4, 4, 4), (2, 3, 8, 1)])
@pytest.mark.parametrize("masked", [True, False])
def test_attention_matches_per_head_reference(rows, queries, heads, kv_heads, masked):
    g = torch.Generator().manual_seed(rows * 100 + queries)
    length = 37
    q = torch.randn(rows, queries, heads, 16, generator=g)
    k = torch.randn(rows, length, kv_heads, 16, generator=g)
    v = torch.randn(rows, length, kv_heads, 16, generator=g)
    mask = None
    if masked:   # rows at different positions, each query sees its row's entries up to itself
        last = torch.randint(queries - 1, length, (rows,), generator=g)
        positions = last[:, None] - queries + 1 + torch.arange(queries)[None]
        mask = torch.arange(length)[None, None, :] <= positions[:, :, None]
    out = attention(q, k, v, mask)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
