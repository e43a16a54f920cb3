"""The target model: a compact decoder for the Llama / Qwen2 / Qwen3 families over a static KV cache.

Weights come from a Hugging Face checkpoint (see engine/loading.py); the forward is ours so that one
call can verify a ragged batch (a different number of query tokens per request, each at its own
absolute positions), tap hidden states at chosen layers for the drafters (reference §1.1), and roll
a request's cache back to any length for free (the cache holds per-slot K/V; validity is a length
the engine keeps, so rollback is forgetting entries, never copying).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.ops import apply_rope, attention, linear, pack_linear, rms_norm, rope_tables, swiglu

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool          # q/k/v biases (Qwen2)
    qk_norm: bool                 # per-head RMSNorm on q and k (Qwen3)

    @classmethod
    def from_hf_config(cls, config) -> ModelArgs:
        arch = (config.architectures or ["?"])[0]
        family = SUPPORTED_ARCHITECTURES[arch]
        return cls(
            family=family,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=family == "qwen3",
        )


class KVCache:
    """K/V for `num_slots` sequences of up to `max_len` tokens: [layers, slots, max_len, kv_heads, hd]."""

    def __init__(self, args: ModelArgs, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (args.num_layers, num_slots, max_len, args.num_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.max_len = max_len


@dataclass
class ForwardOutput:
    hidden: torch.Tensor               # [R, Q, H] after the final norm
    taps: torch.Tensor | None          # [R, Q, m*H] raw outputs of the tapped layers, concatenated


class TargetModel:
    """Holds fused weights; `forward` runs any number of query tokens per row against the cache."""

    def __init__(self, args: ModelArgs, weights: dict[str, torch.Tensor], inv_freq: torch.Tensor,
                 attention_scaling: float, dtype: torch.dtype, device: torch.device):
        self.args = args
        self.dtype = dtype
        self.device = device
        w = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
        self.embed = w["model.embed_tokens.weight"]
        self.lm_head = self.embed if args.tie_word_embeddings else w["lm_head.weight"]
        # Layouts for kernels.ops.linear: on CPU two more copies of the LM head (2 x 113 MB for
        # SmolLM2 in fp32) beside the embedding table it is tied to; nothing is copied elsewhere.
        self.vocab_projection = pack_linear(self.lm_head)
        self.final_norm = w["model.norm.weight"]
        self.layers = []
        for i in range(args.num_layers):
            p = f"model.layers.{i}."
            layer = {
                # One matmul for q, k and v, one for gate and up: fewer ops per token, which is what
                # a small model on a CPU pays for (per-op overhead dominates, see docs/benchmarks.md).
                "wqkv": pack_linear(torch.cat([w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"],
                                               w[p + "self_attn.v_proj.weight"]])),
                "wo": pack_linear(w[p + "self_attn.o_proj.weight"]),
                "w_gate_up": pack_linear(torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])),
                "w_down": pack_linear(w[p + "mlp.down_proj.weight"]),
                "attn_norm": w[p + "input_layernorm.weight"],
                "mlp_norm": w[p + "post_attention_layernorm.weight"],
            }
            if args.attention_bias:
                layer["bqkv"] = torch.cat([w[p + "self_attn.q_proj.bias"], w[p + "self_attn.k_proj.bias"],
                                           w[p + "self_attn.v_proj.bias"]])
            if args.qk_norm:
                layer["q_norm"] = w[p + "self_attn.q_norm.weight"]
                layer["k_norm"] = w[p + "self_attn.k_norm.weight"]
            self.layers.append(layer)
        cos, sin = rope_tables(inv_freq, args.max_position_embeddings + 64, attention_scaling)
        self.cos, self.sin = cos.to(device), sin.to(device)

    def new_cache(self, num_slots: int, max_len: int) -> KVCache:
        return KVCache(self.args, num_slots, max_len, self.dtype, self.device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed[tokens]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states that already went through the final norm."""
        return linear(hidden, self.vocab_projection).float()

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                cache: KVCache, taps: tuple[int, ...] = (), lengths: list[int] | None = None
                ) -> ForwardOutput:
        """tokens, positions: [R, Q]; slots: [R] cache rows. Writes K/V at each token's position.

        A query at position p sees the cache entries 0..p of its row: the caller guarantees entries
        below the row's first position are valid (committed) and the ones written here are the rest.
        `lengths` (ragged batches): row r has lengths[r] real tokens, the rest is padding. The
        per-token work (projections, MLP) then runs on the packed real tokens only; attention sees
        the padded layout (so a round's cost depends on its widest row, engine/sps.py), and padding
        never touches the cache.
        `taps` are layer ids (-1 = embedding output) whose outputs are returned concatenated.
        """
        a = self.args
        R, Q = tokens.shape
        valid = None
        if lengths is not None and any(n < Q for n in lengths):
            valid = torch.arange(Q, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
        pack = (lambda t: t[valid]) if valid is not None else (lambda t: t)
        x = self.embed[pack(tokens)]
        tapped = {-1: x} if -1 in taps else {}
        kv_end = int(positions.max()) + 1
        # Batch 1 decoding sees every cached entry: no mask lets SDPA take its fastest path.
        mask = None
        if Q > 1 or R > 1:
            mask = torch.arange(kv_end, device=self.device)[None, None, :] <= positions[:, :, None]
        cos, sin = self.cos[positions], self.sin[positions]
        contiguous = R == 1 or bool((slots[1:] - slots[:-1] == 1).all())
        s0 = int(slots[0])
        rows, cols = (valid.nonzero(as_tuple=True) if valid is not None else
                      (slots[:, None].expand(R, Q), positions))
        write_slots = slots[rows] if valid is not None else rows
        write_pos = positions[rows, cols] if valid is not None else cols
        nq, nkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer["attn_norm"], a.rms_norm_eps)
            qkv = linear(h, layer["wqkv"])
            if a.attention_bias:
                qkv = qkv + layer["bqkv"]
            if valid is not None:
                padded = qkv.new_zeros(R, Q, qkv.shape[-1])
                padded[valid] = qkv
                qkv = padded
            q = qkv[..., :nq].view(R, Q, a.num_heads, a.head_dim)
            k = qkv[..., nq:nq + nkv].view(R, Q, a.num_kv_heads, a.head_dim)
            v = qkv[..., nq + nkv:].view(R, Q, a.num_kv_heads, a.head_dim)
            if a.qk_norm:
                q = rms_norm(q, layer["q_norm"], a.rms_norm_eps)
                k = rms_norm(k, layer["k_norm"], a.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            ck, cv = cache.k[i], cache.v[i]
            ck[write_slots, write_pos] = pack(k)
            cv[write_slots, write_pos] = pack(v)
            if contiguous:
                keys, values = ck[s0:s0 + R, :kv_end], cv[s0:s0 + R, :kv_end]
            else:
                keys, values = ck[slots, :kv_end], cv[slots, :kv_end]
            o = pack(attention(q, keys, values, mask).reshape(R, Q, nq))
            x = x + linear(o, layer["wo"])
            x = x + swiglu(rms_norm(x, layer["mlp_norm"], a.rms_norm_eps), layer["w_gate_up"], layer["w_down"])
            if i in taps:
                tapped[i] = x
        hidden = rms_norm(x, self.final_norm, a.rms_norm_eps)
        tap_tensor = torch.cat([tapped[t] for t in taps], dim=-1) if taps else None
        if valid is not None:
            hidden = self._unpack(hidden, valid)
            tap_tensor = None if tap_tensor is None else self._unpack(tap_tensor, valid)
        return ForwardOutput(hidden=hidden, taps=tap_tensor)

    @staticmethod
    def _unpack(packed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        out = packed.new_zeros(*valid.shape, packed.shape[-1])
        out[valid] = packed
        return out
