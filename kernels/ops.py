"""Torch reference implementations of the engine's per-layer operators."""

from __future__ import annotations

from dataclasses import dataclass

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

    Grouped-query attention without materialising repeated K/V heads: the G = nh / nkv query heads
    that share a K/V head are folded into the query axis, so SDPA sees [R, nkv, Q * G, hd] against
    [R, nkv, L, hd]. Same arithmetic per (query, key) pair as SDPA's own `enable_gqa`, but torch's
    CPU flash kernel then runs one block of Q * G queries per K/V head, where with `enable_gqa` and
    Q > 1 it took 2.1x as long (bf16, 16 rows, context 400: 0.76 against 0.39 ms at Q = 2, 0.98
    against 0.61 at Q = 8). That gap made every verify round with a draft cost ~40% more than a
    plain one at 16 rows (engine/sps.py). Plain decoding (Q = 1) is folded too: on an AVX-512 host
    without AMX, `enable_gqa` at Q = 1 took 5-7x as long as the fold (bf16, context 512: 8.2 against
    1.2 ms at 32 rows), which made a plain step cost twice a step verifying one draft token; on the
    AMX host it was 0.035 against 0.046 ms at one row and even from 16 rows.
    """
    R, Q, nh, hd = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    if g == 1:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=None if mask is None else mask.unsqueeze(1), scale=scale)
        return out.transpose(1, 2)
    # Head h uses K/V head h // g (the HF grouping), so [nh] splits as [nkv, g].
    qf = q.reshape(R, Q, nkv, g, hd).permute(0, 2, 1, 3, 4).reshape(R, nkv, Q * g, hd)
    if mask is not None:
        mask = mask[:, None, :, None, :].expand(R, 1, Q, g, mask.shape[-1]).reshape(R, 1, Q * g, -1)
    out = F.scaled_dot_product_attention(qf, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.view(R, nkv, Q, g, hd).permute(0, 2, 1, 3, 4).reshape(R, Q, nh, hd)


@dataclass(frozen=True)
class LinearWeight:
    """A linear layer's weight [out, in] in the layouts `linear` picks from by row count.

    On CPU in fp32 there are two copies, measured on the 2-core dev box (AVX2, MKL as torch's BLAS;
    scripts/linear_layouts.py, docs/benchmarks.md "Linear layers on CPU"):
      - one row (a batch-1 decode step): `x @ w_t` with w_t a contiguous [in, out] copy, which beats
        `x @ w.t()` (LM head 7.0 vs 11.6 ms) and, with one thread, oneDNN (8.6 vs 16.7 ms);
      - more rows (a verify block, prefill, a batch): oneDNN's kernel on its own blocked copy. For
        SmolLM2's 30 layers at 2 / 8 / 16 rows it takes 40 / 53 / 54 ms where MKL's small-M GEMM
        takes 79 / 85 / 90 (one row through w_t: 35), and 7.7 / 12 / 14 ms for the LM head against
        28 / 36 / 35.
    The second is what makes verifying a few draft tokens nearly as cheap as decoding one, which is
    what SPS(B) rewards (paper §3.2.2). Elsewhere (CUDA, bf16) `w_t` is a view and nothing is copied.
    """
    w_t: torch.Tensor                  # [in, out]
    packed: torch.Tensor | None = None  # oneDNN layout (CPU fp32 only)


def pack_linear(weight: torch.Tensor) -> LinearWeight:
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return LinearWeight(weight.t())
    try:  # the ops torch's own compiled CPU path (inductor) uses; absent from builds without oneDNN
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    except (AttributeError, RuntimeError):
        packed = None
    return LinearWeight(weight.t().contiguous(), packed)


def linear(x: torch.Tensor, weight: LinearWeight) -> torch.Tensor:
    """x [..., in] -> [..., out]."""
    if weight.packed is not None and x.numel() > x.shape[-1]:
        return torch.ops.mkldnn._linear_pointwise(x, weight.packed, None, "none", [], "")
    if x.dim() > 2 and not _folds(x):
        # torch's matmul folds a 3-D x into one 2-D product only when its leading strides chain
        # exactly (a size-1 dim's too); otherwise it runs bmm on a contiguous copy of the whole
        # transposed weight. A prefix of the draft block (x[:, :k]) is such an x: for the 16k x 576
        # bf16 head that took 332 ms against 1.3 (16 rows x 2) and 39 against 0.9 (1 x 2).
        return linear(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
    return x @ weight.w_t


def _folds(x: torch.Tensor) -> bool:
    return all(x.stride(i) == x.stride(i + 1) * x.shape[i + 1] for i in range(x.dim() - 2))


def swiglu(x: torch.Tensor, w_gate_up: LinearWeight, w_down: LinearWeight) -> torch.Tensor:
    gate, up = linear(x, w_gate_up).chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w_down)
