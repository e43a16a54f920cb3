"""Token sampling and the lossless verification rule (reference §4.3 steps 5-7).

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft token x_i with
probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample the bonus token from
normalize(max(0, p - q)), otherwise from the target's next distribution. The committed tokens are
then distributed exactly as the target alone would sample them. Under greedy decoding p is one-hot
at the argmax, so a draft token is accepted iff it equals the target's argmax.

A request with a seed is sampled another way, so that its output is a function of its prompt and
seed alone: the same tokens whatever the method, the drafts, the verification budgets and the other
requests in the batch. Rejection sampling cannot give that: which token it commits depends on the
draft, and the draft on where the round began. So output position t is drawn by the Gumbel-max
trick with noise g_t that depends only on (seed, t): y_t = argmax(log p_t + g_t), exactly a draw
from p_t, and a draft token is accepted iff it equals y_t. The drafter draws its own token for t
with the same g_t (`sample_coupled` over q), so that where q is close to p it proposes the same
token: P(x = y) >= (1 - TV(p, q)) / (1 + TV(p, q)) (Daliri, Musco and Suresh 2024, "Coupling
without communication and drafter-invariant speculative decoding"), against 1 - TV(p, q) for
rejection sampling and sum(p * q) for a draft drawn independently.
"""

from __future__ import annotations

import hashlib

import torch

from engine.api import SamplingParams


# The nucleus is looked for among this many most likely tokens first (see `nucleus`).
NUCLEUS_CANDIDATES = 256


def target_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [N, V] the target samples from: temperature, then the top-p nucleus."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    return nucleus(probs, params.top_p) if params.top_p < 1.0 else probs


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest most-likely prefix of each row whose mass reaches top_p (its first token
    always stays), renormalised. Ranking a whole 49k vocabulary per sampled token dominated a decode
    step at batch 256 (a sort per request); the prefix is almost always among the few hundred most
    likely tokens, which topk finds, so every row is sorted in full only when those fall short.
    The kept mass is read off the running sum rather than summed over the row: a row-wise scan
    gives every row the same bits whatever else is in the batch, where a lone row's 49k-long sum is
    split over threads (measured: up to 6e-8 apart from the same row's sum in a batch)."""
    ranked, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
    if bool((ranked.sum(dim=-1) < top_p).any()):
        ranked, order = probs.sort(dim=-1, descending=True)
    running = ranked.cumsum(dim=-1)
    outside = running - ranked >= top_p
    mass = running.gather(-1, (~outside).sum(dim=-1, keepdim=True) - 1)
    return torch.zeros_like(probs).scatter_(-1, order, ranked.masked_fill(outside, 0.0)) / mass


def target_distributions(rows: list[tuple[torch.Tensor, SamplingParams]],
                         device: torch.device | str | None = None) -> list[torch.Tensor]:
    """`target_distribution` of several requests' logits [n_i, V], moved to `device` (the host, where
    each request's generator draws, for verification) in one copy. Requests with the same
    temperature and top-p go through one call: per request, a sampled round cost ~0.5 ms of CPU
    (12% of a round at 32 requests) and on a GPU a dozen kernel launches and two syncs."""
    groups: dict[tuple[float, float], list[int]] = {}
    for i, (_, params) in enumerate(rows):
        groups.setdefault((params.temperature, params.top_p), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for members in groups.values():
        probs = target_distribution(torch.cat([rows[i][0] for i in members]), rows[members[0]][1])
        probs = probs if device is None else probs.to(device)
        for i, part in zip(members, probs.split([len(rows[i][0]) for i in members])):
            out[i] = part
    return out


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> int:
    # Each request's generator lives on the CPU (seeded streams are then the same on any device),
    # so the distribution comes to it: one V-float copy per sampled token on a GPU.
    # Inverse CDF with one uniform draw: ~0.3 ms a token over SmolLM2's 49k vocabulary on this CPU,
    # where torch.multinomial took ~2.3 ms (measured side by side). A zero-probability token adds
    # an empty step to the CDF, so it is never picked.
    cdf = probs.cpu().double().cumsum(dim=0)   # float64 after the copy: half the bytes off a GPU
    u = torch.rand((), generator=generator, dtype=torch.float64)
    return int(torch.searchsorted(cdf, u * cdf[-1], right=True))


def position_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """Gumbel noise [V] (float64, on the host) for output position `position` of a request seeded with
    `seed`: a function of the two alone, so every method and schedule draws position t alike."""
    digest = hashlib.blake2b(seed.to_bytes(8, "big") + position.to_bytes(8, "big"), digest_size=8).digest()
    u = torch.rand(vocab_size, generator=torch.Generator().manual_seed(int.from_bytes(digest, "big")),
                   dtype=torch.float64)
    return -torch.log(-torch.log(u))    # u = 0 gives -inf: that token is never drawn


def sample_coupled(probs: torch.Tensor, seed: int, position: int) -> int:
    """Draw from `probs` [V] with output position `position`'s noise (see the module docstring)."""
    noise = position_noise(seed, position, probs.shape[-1])
    return int((probs.cpu().double().log() + noise).argmax())


def first_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The token sampled from the prefill's last logit (not a speculative round, reference §4.2):
    output position 0."""
    if params.greedy:
        return int(logits.argmax())
    probs = target_distribution(logits[None], params)[0]
    return sample_from(probs, generator) if params.seed is None else sample_coupled(probs, params.seed, 0)


def accept_greedy(draft: list[int], choice: list[int]) -> tuple[int, int]:
    """Greedy verification: the longest prefix of `draft` equal to the target's argmax `choice`
    (choice[i] follows the anchor and draft[:i]) and the target's token after it."""
    a = 0
    while a < len(draft) and draft[a] == choice[a]:
        a += 1
    return a, choice[a]


def verify_block(draft: list[int], draft_probs: torch.Tensor | None, p: torch.Tensor,
                 generator: torch.Generator) -> tuple[int, int]:
    """Accept a prefix of `draft` and pick the bonus token, for a sampled request (T > 0; a greedy
    one goes through `accept_greedy`, with the round's argmax taken once for all of them).

    p: [L+1, V] on the host (`target_distributions`), row i is the target's distribution after the
    anchor and draft[:i].
    draft_probs: [L, V] the draft distribution each token was sampled from, or None for a
    deterministic drafter (q is one-hot at the proposed token).
    Returns (accepted count a, bonus token).
    """
    if draft_probs is not None:
        draft_probs = draft_probs.to(p.device)   # one copy off a GPU, not one sync per token
    for i, x in enumerate(draft):
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        ratio = float(p[i, x]) / max(q_x, 1e-8)
        u = float(torch.rand((), generator=generator))
        if u < min(1.0, ratio):
            continue
        if draft_probs is None:
            residual = p[i].clone()
            residual[x] = 0.0
        else:
            residual = (p[i] - draft_probs[i].float()).clamp_min(0.0)
        mass = float(residual.sum())
        residual = residual / mass if mass > 1e-8 else p[i]
        return i, sample_from(residual, generator)
    return len(draft), sample_from(p[len(draft)], generator)


def verify_seeded(draft: list[int], p: torch.Tensor, seed: int, position: int) -> tuple[int, int]:
    """Verification for a sampled request with a seed: the target's own draws y_i = `sample_coupled`
    (p[i], seed, position + i) for output positions position, position + 1, ...; the longest prefix
    of `draft` equal to them is accepted and the bonus token is the draw after it. p as in
    `verify_block`."""
    for i, x in enumerate(draft):
        y = sample_coupled(p[i], seed, position + i)
        if x != y:
            return i, y
    return len(draft), sample_coupled(p[len(draft)], seed, position + len(draft))
