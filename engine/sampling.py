"""Token sampling and the lossless verification rule (reference §4.3 steps 5-7).

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept draft token x_i with
probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection sample the bonus token from
normalize(max(0, p - q)), otherwise from the target's next distribution. The committed tokens are
then distributed exactly as the target alone would sample them. Under greedy decoding p is one-hot
at the argmax, so a draft token is accepted iff it equals the target's argmax.
"""

from __future__ import annotations

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


def first_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The token sampled from the prefill's last logit (not a speculative round, reference §4.2)."""
    if params.greedy:
        return int(logits.argmax())
    return sample_from(target_distribution(logits[None], params)[0], generator)


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
