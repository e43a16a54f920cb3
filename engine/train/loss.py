"""Training losses (reference §3.3, §3.5).

DSpark: L = 0.1 CE + 0.9 L1(p_d, p_t) + 1.0 BCE(z, c*), each a weighted mean with position weights
w[n, t] = eval_mask[n, t] * exp(-t / 4) (t = 0..B-1, eval_mask already a prefix); c* = clamp(1 - L1/2)
detached. DFlash: the weighted CE alone. EAGLE-3: soft CE against the target distribution, the mean
over valid positions of TTT step s weighted by 0.8^s.

The target distribution may be known only on a `support` (the target's top-k tokens, which is what
the cache stores): then L1 is taken between the two distributions coarsened to support + {rest},
i.e. sum over the support of |p_d - p_t| plus |p_d(rest) - p_t(rest)|. That is exactly the L1 when
p_t is known everywhere (support all True) and a lower bound otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_DECAY_GAMMA = 4.0
CE_WEIGHT, L1_WEIGHT, CONF_WEIGHT = 0.1, 0.9, 1.0
EAGLE_STEP_DECAY = 0.8


@dataclass
class LossParts:
    total: torch.Tensor
    ce: float
    l1: float
    conf: float
    accept: list[float]            # mean c* per position (teacher-forced acceptance), weighted by eval_mask
    blocks: int = 0                # blocks (DSpark) or positions (EAGLE-3 step 0) supervised


def position_weights(eval_mask: torch.Tensor, gamma: float = LOSS_DECAY_GAMMA) -> torch.Tensor:
    """eval_mask [N, B] bool -> w [N, B] = prefix(eval_mask) * exp(-t / gamma)."""
    prefix = torch.cumprod(eval_mask.to(torch.float32), dim=-1)
    t = torch.arange(eval_mask.shape[-1], dtype=torch.float32, device=eval_mask.device)
    return prefix * torch.exp(-t / gamma)


def l1_distance(p_d: torch.Tensor, p_t: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
    """||p_d - p_t||_1 over the last axis (see the module note for `support`)."""
    if support is None:
        return (p_d - p_t).abs().sum(-1)
    s = support.to(p_d.dtype)
    known = ((p_d - p_t).abs() * s).sum(-1)
    rest_d = 1.0 - (p_d * s).sum(-1)
    rest_t = 1.0 - (p_t * s).sum(-1)
    return known + (rest_d - rest_t).abs()


def _weighted_mean(term: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (term * w).sum() / w.sum().clamp_min(1e-8)


def dspark_loss(draft_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor,
                conf_logits: torch.Tensor | None, eval_mask: torch.Tensor,
                support: torch.Tensor | None = None, ce_only: bool = False) -> LossParts:
    """draft_logits, target_probs [N, B, V]; labels [N, B] (indices into V); conf_logits [N, B] or
    None (no confidence head); eval_mask [N, B] bool. ce_only: the DFlash objective."""
    w = position_weights(eval_mask)
    logp = F.log_softmax(draft_logits.float(), dim=-1)
    ce = -logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    l_ce = _weighted_mean(ce, w)
    l1 = l1_distance(logp.exp(), target_probs.float(), support)
    l_l1 = _weighted_mean(l1, w)
    c_star = (1.0 - 0.5 * l1.detach()).clamp(0.0, 1.0)
    l_conf = torch.zeros((), device=draft_logits.device)
    if conf_logits is not None:
        bce = F.binary_cross_entropy_with_logits(conf_logits.float(), c_star, reduction="none")
        l_conf = _weighted_mean(bce, w)
    if ce_only:
        total = l_ce
    else:
        total = CE_WEIGHT * l_ce + L1_WEIGHT * l_l1 + CONF_WEIGHT * l_conf
    mask = torch.cumprod(eval_mask.to(torch.float32), dim=-1)
    accept = ((c_star * mask).sum(0) / mask.sum(0).clamp_min(1)).tolist()
    return LossParts(total, l_ce.item(), l_l1.item(), l_conf.item(), accept, int(eval_mask[:, 0].sum()))


def eagle3_loss(step_logits: list[torch.Tensor], step_targets: list[torch.Tensor],
                step_masks: list[torch.Tensor], support: list[torch.Tensor] | None = None) -> LossParts:
    """Per TTT step s: logits [S, V], target probs [S, V], valid [S] bool. Soft CE, weight 0.8^s.
    With a support (top-k), the target's mass outside it is dropped (its log p_d is unknown)."""
    total = torch.zeros((), device=step_logits[0].device)
    ce_sum, accept = 0.0, []
    for s, (logits, p_t, valid) in enumerate(zip(step_logits, step_targets, step_masks)):
        logp = F.log_softmax(logits.float(), dim=-1)
        soft_ce = -(p_t.float() * logp).sum(-1)
        n = valid.sum().clamp_min(1)
        step = (soft_ce * valid).sum() / n
        total = total + EAGLE_STEP_DECAY ** s * step
        ce_sum += step.item()
        sup = None if support is None else support[s]
        c_star = (1.0 - 0.5 * l1_distance(logp.detach().exp(), p_t.float(), sup)).clamp(0, 1)
        accept.append(float((c_star * valid).sum() / n))
    return LossParts(total, ce_sum / len(step_logits), math.nan, math.nan, accept, int(step_masks[0].sum()))
