"""CPU operator paths give the same numbers as the plain expressions they replace."""

import pytest
import torch

from kernels.ops import VOCAB_CHUNK, project_vocab


@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (3, 64), (1, 8, 64), (4, 7, 64)])
def test_project_vocab_cpu_paths_equal_plain_product(shape):
    g = torch.Generator().manual_seed(0)
    # A vocabulary that is not a multiple of the chunk, so the last chunk is short.
    weight = torch.randn(2 * VOCAB_CHUNK + 37, 64, generator=g)
    x = torch.randn(shape, generator=g)
    plain = project_vocab(x, weight)
    assert plain.shape == (*shape[:-1], weight.shape[0])
    assert torch.equal(plain, x @ weight.t())
    tuned = project_vocab(x, weight, weight.t().contiguous())
    assert tuned.shape == plain.shape
    torch.testing.assert_close(tuned, plain, rtol=1e-6, atol=1e-5)
    assert torch.equal(tuned.argmax(-1), plain.argmax(-1))
