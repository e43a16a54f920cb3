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


def target_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [N, V] the target samples from: temperature, then the top-p nucleus."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (its first token always stays)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> int:
    # Each request's generator lives on the CPU (seeded streams are then the same on any device),
    # so the distribution comes to it: one V-float copy per sampled token on a GPU.
    return int(torch.multinomial(probs.float().cpu(), 1, generator=generator))


def first_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The token sampled from the prefill's last logit (not a speculative round, reference §4.2)."""
    if params.greedy:
        return int(logits.argmax())
    return sample_from(target_distribution(logits[None], params)[0], generator)


def verify_block(draft: list[int], draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
                 params: SamplingParams, generator: torch.Generator) -> tuple[int, int]:
    """Accept a prefix of `draft` and pick the bonus token.

    target_logits: [L+1, V], row i is the target's prediction after the anchor and draft[:i].
    draft_probs: [L, V] the draft distribution each token was sampled from, or None for a
    deterministic drafter (q is one-hot at the proposed token).
    Returns (accepted count a, bonus token).
    """
    L = len(draft)
    if params.greedy:
        choice = target_logits.argmax(dim=-1).tolist()
        a = 0
        while a < L and draft[a] == choice[a]:
            a += 1
        return a, choice[a]
    p = target_distribution(target_logits, params)
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
    return L, sample_from(p[L], generator)
