"""`linear` gives the plain product's numbers on either CPU path (one row: the transposed copy;
more rows: the oneDNN-packed copy), and the packed path's rows do not depend on the other rows in
the call."""

import pytest
import torch

from kernels.ops import linear, pack_linear


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
