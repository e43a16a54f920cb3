"""Pieces the learned drafters share: fused layer weights, a per-slot K/V cache, q/k/v projection.

Like the target's cache (engine/model.py), the drafter's cache is static per engine slot and its
valid length is kept by the drafter: "cropping" after a block (reference §4.3 step 1) is forgetting
entries, which the next writes overwrite.
"""

from __future__ import annotations

import torch

from engine.drafters.checkpoint import DrafterConfig
from kernels.ops import apply_rope, linear, pack_linear, rms_norm


def fuse_layer(w: dict[str, torch.Tensor], prefix: str, qk_norm: bool, context_kv: bool = False) -> dict:
    """One decoder layer's weights with q/k/v and gate/up concatenated (one matmul each), in the
    layouts of kernels.ops.linear. `context_kv` adds "wkv", k/v alone, for a drafter whose context
    features only become keys and values (DSpark / DFlash; EAGLE-3 runs its context through q too)."""
    k, v = (w[prefix + f"self_attn.{n}_proj.weight"] for n in "kv")
    layer = {
        "wqkv": pack_linear(torch.cat([w[prefix + "self_attn.q_proj.weight"], k, v])),
        "wo": pack_linear(w[prefix + "self_attn.o_proj.weight"]),
        "w_gate_up": pack_linear(torch.cat([w[prefix + "mlp.gate_proj.weight"], w[prefix + "mlp.up_proj.weight"]])),
        "w_down": pack_linear(w[prefix + "mlp.down_proj.weight"]),
        "attn_norm": w[prefix + "input_layernorm.weight"],
        "mlp_norm": w[prefix + "post_attention_layernorm.weight"],
    }
    if context_kv:
        layer["wkv"] = pack_linear(torch.cat([k, v]))
    if qk_norm:
        layer["q_norm"] = w[prefix + "self_attn.q_norm.weight"]
        layer["k_norm"] = w[prefix + "self_attn.k_norm.weight"]
    return layer


class DraftCache:
    """K/V [layers, slots, max_len, kv_heads, hd] for the drafter's own context entries."""

    def __init__(self, c: DrafterConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (c.num_hidden_layers, slots, max_len, c.num_key_value_heads, c.dim_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len


class Projector:
    """q / k / v of one layer, with the Qwen3 per-head norms and RoPE at absolute positions."""

    def __init__(self, c: DrafterConfig, cos: torch.Tensor, sin: torch.Tensor):
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.dim_head
        self.eps = c.rms_norm_eps
        self.cos, self.sin = cos, sin

    def kv(self, layer: dict, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> k, v [..., nkv, hd] (k normed and rotated)."""
        nkv = self.nkv * self.hd
        kv = linear(x, layer["wkv"])
        k = kv[..., :nkv].unflatten(-1, (self.nkv, self.hd))
        v = kv[..., nkv:].unflatten(-1, (self.nkv, self.hd))
        return self._rope(self._norm(k, layer, "k_norm"), positions), v

    def qkv(self, layer: dict, x: torch.Tensor, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [R, Q, D] -> q [R, Q, nh, hd], k, v [R, Q, nkv, hd]."""
        nq, nkv = self.nh * self.hd, self.nkv * self.hd
        qkv = linear(x, layer["wqkv"])
        q = qkv[..., :nq].unflatten(-1, (self.nh, self.hd))
        k = qkv[..., nq:nq + nkv].unflatten(-1, (self.nkv, self.hd))
        v = qkv[..., nq + nkv:].unflatten(-1, (self.nkv, self.hd))
        q = self._rope(self._norm(q, layer, "q_norm"), positions)
        k = self._rope(self._norm(k, layer, "k_norm"), positions)
        return q, k, v

    def _norm(self, x: torch.Tensor, layer: dict, name: str) -> torch.Tensor:
        return rms_norm(x, layer[name], self.eps) if name in layer else x

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # apply_rope wants [R, Q, heads, hd]; flat context rows come as [N, heads, hd]
        if x.dim() == 3:
            return apply_rope(x[None], self.cos[positions][None], self.sin[positions][None])[0]
        return apply_rope(x, self.cos[positions], self.sin[positions])
