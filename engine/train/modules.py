"""Trainable drafters whose state-dict names are exactly DeepSpec's (reference §2.2, §2.4), so
`save_checkpoint(dir, config, module.state_dict())` writes what engine/drafters/ serves.

The target's embedding, LM head and RoPE tables are used as frozen tensors, never registered as
parameters (nor stored). The forward passes mirror the inference drafters operation for operation
(engine/drafters/dspark.py, eagle3.py) with the training-time masks of §1.1 and §3.5:
  DSpark / DFlash: block n (anchor a_n) attends to context keys j < a_n and to its own block.
  EAGLE-3 (TTT): step s at index i attends to step-0 keys j <= i and to steps 1..s at index i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.drafters.checkpoint import DrafterConfig
from engine.model import TargetModel
from kernels.ops import apply_rope, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c: DrafterConfig, width: int):
        super().__init__()
        self.nh, self.nkv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.dim_head
        self.q_proj = nn.Linear(width, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(width, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(width, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, c.hidden_size, bias=False)
        if c.family == "qwen3":
            self.q_norm = RMSNorm(self.hd, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, c.rms_norm_eps)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, query: bool):
        """x [..., Q, D], cos/sin [..., Q, hd] -> (q or None, k, v) with heads split, normed, rotated."""
        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.unflatten(-1, (n, self.hd))

        def rope(t: torch.Tensor) -> torch.Tensor:
            flat = t.dim() == 3                     # [Q, heads, hd] -> apply_rope wants a row axis
            out = apply_rope(t[None] if flat else t, cos[None] if flat else cos, sin[None] if flat else sin)
            return out[0] if flat else out

        k = heads(self.k_proj(x), self.nkv)
        v = heads(self.v_proj(x), self.nkv)
        if hasattr(self, "k_norm"):
            k = self.k_norm(k)
        q = None
        if query:
            q = heads(self.q_proj(x), self.nh)
            if hasattr(self, "q_norm"):
                q = self.q_norm(q)
            q = rope(q)
        return q, rope(k), v

    def grouped(self, q: torch.Tensor) -> torch.Tensor:
        """[..., nh, hd] -> [..., nkv, group, hd] (GQA without repeating K/V)."""
        return q.unflatten(-2, (self.nkv, self.nh // self.nkv))


class MLP(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: DrafterConfig, eagle: bool):
        super().__init__()
        self.self_attn = Attention(c, 2 * c.hidden_size if eagle else c.hidden_size)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if eagle:
            self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class MarkovHead(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        V, r, H = c.vocab_size, c.markov_rank, c.hidden_size
        self.kind = c.markov_head_type
        self.markov_w1 = nn.Embedding(V, r)
        self.markov_w2 = nn.Linear(r, V, bias=False)
        if self.kind == "gated":
            self.gate_proj = nn.Linear(H + r, r)
        elif self.kind == "rnn":
            self.joint_proj = nn.Linear(2 * r + H, 3 * r)

    def bias(self, hidden: torch.Tensor, prev: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
        """hidden [N, B, H], prev [N, B] (teacher-forced previous tokens) -> bias [N, B, |vocab|]."""
        e = self.markov_w1(prev)
        if self.kind == "vanilla":
            z = e
        elif self.kind == "gated":
            z = torch.sigmoid(self.gate_proj(torch.cat([hidden, e], dim=-1))) * e
        else:
            state, outs = e.new_zeros(e.shape[0], e.shape[-1]), []
            for k in range(e.shape[1]):
                g, c, o = self.joint_proj(torch.cat([state, e[:, k], hidden[:, k]], dim=-1)).chunk(3, dim=-1)
                keep = torch.sigmoid(g)
                state = keep * state + (1 - keep) * torch.tanh(c)
                outs.append(torch.tanh(o))
            z = torch.stack(outs, dim=1)
        return z @ self.markov_w2.weight[vocab].t()


class ConfidenceHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, 1)


def attend(attn: Attention, q: torch.Tensor, keys: list[tuple[torch.Tensor, torch.Tensor, str, torch.Tensor | None]]
           ) -> torch.Tensor:
    """Softmax over several key groups at once. q [..., nh, hd]; each group (k, v, einsum layout,
    mask broadcastable to the scores or None). Returns [..., nh * hd]."""
    qg = attn.grouped(q) * attn.hd ** -0.5
    scores = []
    for k, _, layout, mask in keys:
        s = torch.einsum(layout, qg, k)
        scores.append(s if mask is None else s.masked_fill(~mask, float("-inf")))
    p = torch.softmax(torch.cat(scores, dim=-1).float(), dim=-1).to(q.dtype)
    out, start = 0, 0
    for (k, v, layout, _), s in zip(keys, scores):
        width = s.shape[-1]
        inputs, output = layout.split("->")
        a, b = inputs.split(",")
        out = out + torch.einsum(f"{output},{b}->{a}", p[..., start:start + width], v)
        start += width
    return out.flatten(-3)


class DSparkTrainable(nn.Module):
    """DSpark (Markov + confidence heads) or DFlash (neither): one sequence per call."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.config = c
        H = c.hidden_size
        self.fc = nn.Linear(len(c.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, c.rms_norm_eps)
        self.layers = nn.ModuleList(Layer(c, eagle=False) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(H, c.rms_norm_eps)
        if c.markov_rank:
            self.markov_head = MarkovHead(c)
        if c.enable_confidence_head:
            self.confidence_head = ConfidenceHead(H + (c.markov_rank if c.confidence_head_with_markov else 0))

    def block_hidden(self, target: TargetModel, taps: torch.Tensor, ids: torch.Tensor,
                     anchors: torch.Tensor) -> torch.Tensor:
        """taps [S, m*H], ids [S], anchors [N] -> post-norm hidden [N, B, H] of the anchor-first blocks."""
        c, B, S = self.config, self.config.block, taps.shape[0]
        ctx = self.hidden_norm(self.fc(taps.float()))
        blk = torch.full((len(anchors), B), c.mask_token_id, dtype=torch.long, device=ids.device)
        blk[:, 0] = ids[anchors]
        positions = anchors[:, None] + torch.arange(B, device=ids.device)
        ctx_pos = torch.arange(S, device=ids.device)
        visible = (ctx_pos[None, :] < anchors[:, None])[:, None, None, None, :]    # [N, 1, 1, 1, S]
        h = target.embed_tokens(blk).float()
        for layer in self.layers:
            attn = layer.self_attn
            _, k_c, v_c = attn.project(ctx, target.cos[ctx_pos], target.sin[ctx_pos], query=False)
            q, k_b, v_b = attn.project(layer.input_layernorm(h), target.cos[positions], target.sin[positions],
                                       query=True)
            o = attend(attn, q, [(k_c, v_c, "nbkgd,skd->nbkgs", visible),
                                 (k_b, v_b, "nbkgd,nckd->nbkgc", None)])
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    def heads(self, target: TargetModel, hidden: torch.Tensor, prev: torch.Tensor, vocab: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced logits over `vocab` [N, B, |vocab|] and confidence logits [N, B] (or None)."""
        logits = hidden @ target.lm_head[vocab].float().t()
        if hasattr(self, "markov_head"):
            logits = logits + self.markov_head.bias(hidden, prev, vocab)
        conf = None
        if hasattr(self, "confidence_head"):
            x = hidden
            if self.config.confidence_head_with_markov:
                x = torch.cat([hidden, self.markov_head.markov_w1(prev)], dim=-1)
            conf = self.confidence_head.proj(x)[..., 0]
        return logits, conf


class Eagle3Trainable(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.config = c
        H = c.hidden_size
        self.fc = nn.Linear(len(c.target_layer_ids) * H, H, bias=False)
        self.layers = nn.ModuleList([Layer(c, eagle=True)])
        self.norm = RMSNorm(H, c.rms_norm_eps)

    def ttt(self, target: TargetModel, taps: torch.Tensor, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Unrolled test-time training over a sequence of S tokens. Step s, index i: the token at
        i+1+s with (s = 0) the fused target features of position i or (s > 0) step s-1's output at i,
        at RoPE position i+s. Returns per step the post-norm hidden [S-1-s, H] predicting token i+2+s."""
        layer, attn = self.layers[0], self.layers[0].self_attn
        S = taps.shape[0]
        hidden = self.fc(taps.float())[:S - 1]
        index = torch.arange(S - 1, device=ids.device)
        causal = (index[None, :] <= index[:, None])[:, None, None, :]          # [S-1, 1, 1, S-1]
        past: list[tuple[torch.Tensor, torch.Tensor]] = []
        outputs = []
        for s in range(steps):
            n = S - 1 - s                       # indices whose token i+1+s exists
            tokens = ids[1 + s:1 + s + n]
            x = torch.cat([layer.input_layernorm(target.embed_tokens(tokens).float()),
                           layer.hidden_norm(hidden[:n])], dim=-1)
            pos = index[:n] + s
            q, k, v = attn.project(x, target.cos[pos], target.sin[pos], query=True)
            if s == 0:
                k0, v0 = k, v
            groups = [(k0, v0, "ikgd,jkd->ikgj", causal[:n])]
            # step t's key at index i is a diagonal entry: one score per query, laid out as [n, kv, g, 1]
            for kp, vp in past + [(k, v)] if s else []:
                groups.append((kp[:n, :, None, :], vp[:n, :, None, :], "ikgd,ikxd->ikgx", None))
            o = attend(attn, q, groups)
            h = hidden[:n] + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if s:
                past.append((k, v))
            outputs.append(self.norm(h))
            hidden = h
        return outputs
