"""Torch reference implementations of the engine's per-layer operators."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 as the HF Llama/Qwen3 reference does, so fp32 runs match it bit for bit.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_tables(inv_freq: torch.Tensor, max_len: int, attention_scaling: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim] in fp32 for rotate-half RoPE."""
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [R, Q, heads, hd]; cos/sin: [R, Q, hd] already gathered at each token's absolute position."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    cos = cos.unsqueeze(2).to(x.dtype)
    sin = sin.unsqueeze(2).to(x.dtype)
    return x * cos + rotated * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float | None = None) -> torch.Tensor:
    """q: [R, Q, nh, hd]; k, v: [R, L, nkv, hd]; mask: [R, Q, L] bool (True = may attend) or None.

    Grouped-query attention without materialising repeated K/V heads.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=None if mask is None else mask.unsqueeze(1),
        scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


# Output rows of the vocabulary projection per GEMM call on CPU (see project_vocab).
VOCAB_CHUNK = 1024


def project_vocab(x: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., H] @ weight[V, H].T -> [..., V] (LM-head logits).

    `weight_t` (a contiguous [H, V] copy) selects the CPU path. For the few rows a decode step or a
    verify block has, the CPU BLAS runs this tall-and-thin product far below memory bandwidth; on the
    2-core dev box (SmolLM2, 49152 x 576 fp32, 2 threads, median ms) the plain product costs 12 ms for
    1 row and 33 ms for 8, against ~7 ms to stream the weight once. Two measured fixes: for 1-2
    rows, the [H, V] layout (6.5 ms for 1 row); for more, 1024 vocabulary rows per call (16-19 ms for
    8 rows, 43 ms instead of 67 for 64). Each output element is the same length-H dot product
    either way.
    """
    if weight_t is None:
        return x @ weight.t()
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= 2:
        out = rows @ weight_t
    else:
        out = torch.cat([F.linear(rows, w) for w in weight.split(VOCAB_CHUNK)], dim=1)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ w_gate_up.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_down.t()
