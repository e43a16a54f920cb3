"""The target forward: equal to transformers, consistent across query shapes, rollback for free."""

import pytest
import torch

from engine.loading import load_target


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen3"])
def test_logits_equal_transformers(request, fixture):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(fixture)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    target = load_target(str(path), torch.float32)
    x = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(1))
    cache = target.model.new_cache(1, 64)
    out = target.model.forward(x, torch.arange(24)[None], torch.tensor([0]), cache)
    with torch.no_grad():
        ref = hf(x).logits
    assert torch.equal(target.model.logits(out.hidden), ref)


def test_embedded_model_matches_transformers(smollm_fp32):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm_fp32.path, dtype=torch.float32)
    ids = smollm_fp32.tokenizer.encode("def fibonacci(n):\n    ")
    x = torch.tensor([ids])
    out = smollm_fp32.model.forward(x, torch.arange(len(ids))[None], torch.tensor([0]),
                                    smollm_fp32.model.new_cache(1, 64))
    with torch.no_grad():
        ref = hf(x).logits
    assert torch.allclose(smollm_fp32.model.logits(out.hidden), ref, atol=1e-4)
    assert smollm_fp32.model.args.num_layers == 30 and smollm_fp32.model.args.hidden_size == 576


def test_incremental_decode_matches_full_forward(tiny_llama):
    m = load_target(str(tiny_llama), torch.float32).model
    x = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(2))
    full = m.logits(m.forward(x, torch.arange(16)[None], torch.tensor([0]), m.new_cache(1, 32)).hidden)
    cache = m.new_cache(1, 32)
    m.forward(x[:, :10], torch.arange(10)[None], torch.tensor([0]), cache)
    for i in range(10, 16):
        step = m.logits(m.forward(x[:, i:i + 1], torch.tensor([[i]]), torch.tensor([0]), cache).hidden)
        assert torch.allclose(step[0, 0], full[0, i], atol=1e-5)


def test_rollback_is_forgetting_entries(tiny_llama):
    """Entries written past the valid length (rejected drafts) never leak into later steps."""
    m = load_target(str(tiny_llama), torch.float32).model
    x = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(3))
    clean = m.new_cache(1, 32)
    m.forward(x[:, :8], torch.arange(8)[None], torch.tensor([0]), clean)
    ref = m.logits(m.forward(x[:, 8:12], torch.arange(8, 12)[None], torch.tensor([0]), clean).hidden)
    dirty = m.new_cache(1, 32)
    m.forward(x[:, :8], torch.arange(8)[None], torch.tensor([0]), dirty)
    junk = torch.randint(0, 49152, (1, 6))
    m.forward(junk, torch.arange(8, 14)[None], torch.tensor([0]), dirty)  # rejected drafts
    again = m.logits(m.forward(x[:, 8:12], torch.arange(8, 12)[None], torch.tensor([0]), dirty).hidden)
    assert torch.allclose(again, ref, atol=1e-5)


def test_ragged_batch_rows_match_single_rows(tiny_llama):
    """Two rows at different lengths and query counts in one forward equal each row run alone."""
    m = load_target(str(tiny_llama), torch.float32).model
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 49152, (1, 9), generator=g), torch.randint(0, 49152, (1, 5), generator=g)
    cache = m.new_cache(2, 32)
    m.forward(a[:, :6], torch.arange(6)[None], torch.tensor([0]), cache)
    m.forward(b[:, :4], torch.arange(4)[None], torch.tensor([1]), cache)
    # row 0 verifies 3 tokens at 6..8, row 1 one token at 4 (padded to 3 with junk)
    tokens = torch.stack([a[0, 6:9], torch.cat([b[0, 4:5], torch.tensor([11, 12])])])
    positions = torch.tensor([[6, 7, 8], [4, 5, 6]])
    before = cache.k[:, 1, 5:7].clone()
    out = m.logits(m.forward(tokens, positions, torch.tensor([0, 1]), cache, lengths=[3, 1]).hidden)
    assert torch.equal(cache.k[:, 1, 5:7], before)  # padding never reaches the cache
    solo = m.new_cache(1, 32)
    ref_a = m.logits(m.forward(a, torch.arange(9)[None], torch.tensor([0]), solo).hidden)
    ref_b = m.logits(m.forward(b, torch.arange(5)[None], torch.tensor([0]), m.new_cache(1, 32)).hidden)
    assert torch.allclose(out[0], ref_a[0, 6:9], atol=1e-5)
    assert torch.allclose(out[1, 0], ref_b[0, 4], atol=1e-5)


def test_taps_return_requested_layers(tiny_llama):
    m = load_target(str(tiny_llama), torch.float32).model
    x = torch.randint(0, 49152, (1, 4))
    out = m.forward(x, torch.arange(4)[None], torch.tensor([0]), m.new_cache(1, 8), taps=(-1, 0))
    assert out.taps.shape == (1, 4, 2 * m.args.hidden_size)
    assert torch.equal(out.taps[..., :m.args.hidden_size], m.embed[x])
