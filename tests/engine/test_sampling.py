"""Sampling: the verification rule reproduces the target distribution; seeds reproduce runs."""

import pytest
import torch
from scipy.stats import chisquare

from engine.api import GenerationRequest, SamplingParams
from engine.build import build_engine
from engine.config import EngineConfig
from engine.sampling import sample_coupled, target_distribution, target_distributions, verify_block, verify_seeded

V = 4
PARAMS = SamplingParams(temperature=1.0)
# target: p(x1) and p(x2 | x1); draft: q(x1), q(x2 | x1), deliberately different
P1 = torch.tensor([0.5, 0.2, 0.2, 0.1])
P2 = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])
Q1 = torch.tensor([0.1, 0.3, 0.3, 0.3])
Q2 = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.6, 0.1, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7], [0.5, 0.1, 0.3, 0.1]])


def spec_two_tokens(g: torch.Generator, deterministic: bool) -> tuple[int, int]:
    """Draft two tokens, verify them against the exact target, return the first two committed."""
    if deterministic:
        draft, probs = [2, 3], None
    else:
        x1 = int(torch.multinomial(Q1, 1, generator=g))
        x2 = int(torch.multinomial(Q2[x1], 1, generator=g))
        draft, probs = [x1, x2], torch.stack([Q1, Q2[x1]])
    # target logits row i = prediction after anchor + draft[:i]; row 2 is the distribution after x2
    rows = [P1, P2[draft[0]], torch.full((V,), 1 / V)]
    a, bonus = verify_block(draft, probs, target_distribution(torch.stack(rows).log(), PARAMS), g)
    out = [*draft[:a], bonus]
    if len(out) < 2:  # rejected at x1: the next token comes from the target given the bonus
        out.append(int(torch.multinomial(P2[out[0]], 1, generator=g)))
    return out[0], out[1]


@pytest.mark.parametrize("deterministic", [False, True])
def test_verification_preserves_joint_distribution(deterministic):
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(V, V)
    for _ in range(n):
        x1, x2 = spec_two_tokens(g, deterministic)
        counts[x1, x2] += 1
    expected = (P1[:, None] * P2) * n
    stat = chisquare(counts.flatten().numpy(), expected.flatten().numpy())
    assert stat.pvalue > 1e-3, (counts, expected)


def test_seeded_verification_preserves_the_joint_distribution_and_couples_the_draft():
    """Seeded requests: the drafter draws x1 with position 0's noise over Q1 and x2 with position 1's
    over Q2[x1]; verification keeps the drafts equal to the target's own coupled draws. Over seeds
    the committed pair follows P1 x P2, and x1 matches the target's draw more often than an
    independent draft would (sum P1 * Q1 = 0.2); the Gumbel coupling's bound is (1 - TV) / (1 + TV)."""
    n = 8000
    counts, matched = torch.zeros(V, V), 0
    for seed in range(n):
        x1 = sample_coupled(Q1, seed, 0)
        draft = [x1, sample_coupled(Q2[x1], seed, 1)]
        rows = [P1, P2[x1], torch.full((V,), 1 / V)]
        a, bonus = verify_seeded(draft, target_distribution(torch.stack(rows).log(), PARAMS), seed, 0)
        out = [*draft[:a], bonus]
        if len(out) < 2:
            out.append(sample_coupled(P2[out[0]], seed, 1))
        counts[out[0], out[1]] += 1
        matched += a >= 1
    stat = chisquare(counts.flatten().numpy(), (P1[:, None] * P2 * n).flatten().numpy())
    assert stat.pvalue > 1e-3, counts
    tv = 0.5 * float((P1 - Q1).abs().sum())
    assert matched / n > (1 - tv) / (1 + tv) - 0.02 > float((P1 * Q1).sum())


def test_a_seeded_draw_depends_on_its_seed_and_position_alone():
    probs = torch.softmax(torch.randn(49152, generator=torch.Generator().manual_seed(0)), -1)
    draws = [sample_coupled(probs, 7, t) for t in range(6)]
    assert draws == [sample_coupled(probs.clone(), 7, t) for t in range(6)]
    assert len(set(draws)) > 1 and draws != [sample_coupled(probs, 8, t) for t in range(6)]


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, -3.0]])
    probs = target_distribution(logits, SamplingParams(temperature=1.0, top_p=0.7))
    full = torch.softmax(logits, -1)
    assert probs[0, 2] == 0 and probs[0, 3] == 0  # 0.63 < 0.7 needs the second token only
    assert torch.allclose(probs[0, :2], full[0, :2] / full[0, :2].sum())


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The definition, over the whole sorted vocabulary."""
    ranked, order = probs.sort(dim=-1, descending=True)
    ranked = ranked.masked_fill(ranked.cumsum(dim=-1) - ranked >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, ranked)
    return kept / kept.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])   # flat (nucleus beyond the candidates) to peaked
def test_top_p_from_candidates_equals_full_sort(scale):
    logits = torch.randn(6, 49152, generator=torch.Generator().manual_seed(1)) * scale
    for top_p in (0.1, 0.8, 0.95, 0.999):
        probs = target_distribution(logits, SamplingParams(temperature=1.0, top_p=top_p))
        expected = full_sort_nucleus(torch.softmax(logits, -1), top_p)
        assert torch.equal(probs > 0, expected > 0)
        torch.testing.assert_close(probs, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", [0.3, 5.0])   # the nucleus beyond the candidates (full sort), and within
def test_batched_distributions_equal_each_request_alone(scale):
    """A round computes its sampled requests' distributions together, grouped by temperature and
    top-p; each must be bit for bit what the request alone gets, whatever its batch."""
    g = torch.Generator().manual_seed(2)
    nucleus, plain, wide = (SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(temperature=1.0),
                            SamplingParams(temperature=1.2, top_p=0.95))
    # mostly one-row requests (plain rounds): a lone row is where a reduction splits over threads
    shapes = [(1, nucleus)] * 12 + [(3, plain), (8, nucleus), (2, wide), (1, wide), (1, plain)]
    rows = [(torch.randn(n, 49152, generator=g) * scale, p) for n, p in shapes]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)   # the suite runs one thread, where nothing is split
    try:
        for (logits, p), got in zip(rows, target_distributions(rows)):
            assert torch.equal(got, target_distribution(logits, p))
            torch.testing.assert_close(got.sum(dim=-1), torch.ones(len(logits)))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_engines(tiny_llama):
    return {m: build_engine(EngineConfig(model=str(tiny_llama), method=m, max_batch=1, max_context=128))
            for m in ("ar", "ngram")}


@pytest.mark.parametrize("method", ["ar", "ngram"])
@pytest.mark.parametrize("seeded", [True, False])
def test_end_to_end_distribution_of_first_tokens(tmp_path_factory, method, seeded):
    """Sampling on a real (tiny, 12-token vocabulary) model: the first two tokens follow the
    target's joint distribution computed exactly from its logits, with top-p and temperature.
    seeded: the requests' own seeds (position-coupled draws); otherwise rejection sampling, the
    generators seeded from `engine.rng`, fixed so that the test is deterministic."""
    from engine.loading import load_target
    from engine.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("small-vocab"), vocab_size=12, lm_head_std=0.15, seed=3)
    params = SamplingParams(temperature=1.3, top_p=0.9, max_new_tokens=2)
    m = load_target(str(path), torch.float32).model
    prompt = (5, 9, 5, 9, 5, 9, 5)  # repetitive, so prompt lookup proposes drafts
    cache = m.new_cache(1, 16)
    h = m.forward(torch.tensor([prompt]), torch.arange(7)[None], torch.tensor([0]), cache).hidden
    p1 = target_distribution(m.logits(h[:, -1]), params)[0]
    joint = {}
    for t1 in p1.nonzero().flatten().tolist():
        if t1 == 2:  # EOS ends the output after one token
            joint[(t1,)] = float(p1[t1])
            continue
        h2 = m.forward(torch.tensor([[t1]]), torch.tensor([[7]]), torch.tensor([0]), cache).hidden
        p2 = target_distribution(m.logits(h2[:, -1]), params)[0]
        for t2 in p2.nonzero().flatten().tolist():
            joint[(t1, t2)] = float(p1[t1] * p2[t2])
    engine = build_engine(EngineConfig(model=str(path), method=method, max_batch=1, max_context=32))
    n = 1500
    counts = dict.fromkeys(joint, 0)
    engine.rng.seed(1)
    for seed in range(n):
        sampling = SamplingParams(**{**params.__dict__, "seed": seed if seeded else None})
        out = engine.generate(GenerationRequest("s", prompt, sampling))
        counts[tuple(out.output_ids)] += 1
    keys = [k for k in joint if joint[k] * n >= 5]
    assert len(keys) >= 4  # a distribution worth testing, not one near-certain pair
    stat = chisquare([counts[k] for k in keys], [joint[k] * n * sum(counts[k] for k in keys) /
                                                  (n * sum(joint[k] for k in keys)) for k in keys])
    assert stat.pvalue > 1e-3


def test_seed_reproduces_a_sampled_run(tiny_engines):
    request = lambda: GenerationRequest("s", (1, 2, 3, 4), SamplingParams(temperature=1.0, max_new_tokens=24, seed=7))
    for engine in tiny_engines.values():
        assert engine.generate(request()).output_ids == engine.generate(request()).output_ids


def test_temperature_zero_is_deterministic(tiny_engines):
    req = GenerationRequest("g", (7, 8, 9), SamplingParams(max_new_tokens=16))
    outs = {m: e.generate(req).output_ids for m, e in tiny_engines.items()}
    assert outs["ar"] == outs["ngram"]
