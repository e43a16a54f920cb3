"""The EAGLE-3 drafter (reference §2.4, §5): one layer, chain drafting with its own hidden state.

The layer reads [input_layernorm(embed(token)) ; hidden_norm(h)] (width 2H) with the residual from h.
Context: the fused target features fc(F) of position i are paired with the token at i+1 and run
causally at position i; the last output g predicts the token after the anchor. Drafting feeds g
back as the next hidden state, one forward per token (TTT trains exactly this). After
verification, the chain's K/V entries are dropped and the verified positions' target features
replace them.
"""

from __future__ import annotations

import torch

from engine.drafters.base import Drafter, Horizon, Proposal
from engine.drafters.checkpoint import CheckpointError, DrafterCheckpoint
from engine.drafters.context import PendingContext
from engine.drafters.layers import DraftCache, Projector, fuse_layer
from engine.drafters.markov import new_probs, sample_step
from engine.drafters.vocab import DraftVocab
from engine.model import TargetModel
from engine.sequence import Sequence
from kernels.ops import attention, linear, rms_norm, swiglu


class Eagle3Drafter(Drafter):
    name = "eagle3"

    def __init__(self, checkpoint: DrafterCheckpoint, target: TargetModel, block_size: int,
                 max_slots: int, max_context: int, eos_token_ids: tuple[int, ...]):
        c = checkpoint.config
        if c.num_hidden_layers != 1:
            raise CheckpointError(f"{checkpoint.path}: an EAGLE-3 drafter has one layer, "
                                  f"num_hidden_layers is {c.num_hidden_layers}")
        w = {k: v.to(device=target.device, dtype=target.dtype) for k, v in checkpoint.weights.items()}
        self.config, self.target = c, target
        self.block_size = min(block_size, c.block)
        self.tap_layers = tuple(c.target_layer_ids)
        self.digest = checkpoint.digest
        self.eos = set(eos_token_ids)
        self.eps = c.rms_norm_eps
        self.fc, self.norm = w["fc.weight"], w["norm.weight"]
        self.layer = fuse_layer(w, "layers.0.", c.family == "qwen3")
        self.layer["hidden_norm"] = w["layers.0.hidden_norm.weight"]
        self.proj = Projector(c, target.cos, target.sin)
        self.cache = DraftCache(c, max_slots, max_context + self.block_size + 2, target.dtype, target.device)
        self.vocab = DraftVocab.for_target(target, checkpoint.draft_vocab)

    def start(self, seq: Sequence, prompt_features: torch.Tensor | None) -> None:
        seq.drafter_state = PendingContext()
        seq.drafter_state.add(prompt_features)

    def commit(self, seq: Sequence, features: torch.Tensor | None, verified: int, accepted: int) -> None:
        seq.drafter_state.add(features)

    def release(self, seq: Sequence) -> None:
        seq.drafter_state = None
        self.vocab.release(seq)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], horizon: Horizon | None = None) -> Proposal:
        dev, L = self.target.device, self.block_size
        slots = torch.tensor([seq.slot for seq in seqs], device=dev)
        starts = torch.tensor([seq.kv_len for seq in seqs], device=dev)   # anchor positions
        g = self.extend(seqs, slots)
        self.vocab.cover(seqs)
        tokens = torch.empty((len(seqs), L), dtype=torch.long)
        probs = new_probs(seqs, L, self.vocab.vocab_size, dev)
        for s in range(L):
            logits = self.vocab.logits(rms_norm(g, self.norm, self.eps))
            sample_step(logits, seqs, tokens[:, s], probs, s, self.vocab)
            if s + 1 < L:
                g = self.layer_forward(tokens[:, s, None].to(dev), g[:, None], (starts + s)[:, None], slots)[:, 0]
        rows = [_until_eos(row, self.eos) for row in tokens.tolist()]
        return Proposal(tokens=rows, probs=[None if p is None else p[:len(t)] for p, t in zip(probs, rows)])

    def extend(self, seqs: list[Sequence], slots: torch.Tensor) -> torch.Tensor:
        """Write each row's pending context into the cache; return the last output g [R, H]."""
        dev, R = self.target.device, len(seqs)
        lengths = [len(seq.drafter_state) for seq in seqs]
        width = max(lengths)
        H = self.fc.shape[0]
        hidden = torch.zeros((R, width, H), dtype=self.fc.dtype, device=dev)
        ids = torch.zeros((R, width), dtype=torch.long)
        positions = torch.zeros((R, width), dtype=torch.long)
        valid = torch.zeros((R, width), dtype=torch.bool)
        for r, (seq, n) in enumerate(zip(seqs, lengths)):
            if n == 0:
                raise RuntimeError(f"request {seq.request_id}: no verified features to draft from")
            pending, start = seq.drafter_state.take(seq.kv_len)
            hidden[r, :n] = pending.to(self.fc.dtype) @ self.fc.t()
            ids[r, :n] = torch.tensor(seq.tokens[start + 1:start + n + 1])
            # padding repeats the last real position: its query output is discarded, its K/V not written
            positions[r] = torch.arange(start, start + width).clamp_max(start + n - 1)
            valid[r, :n] = True
        out = self.layer_forward(ids.to(dev), hidden, positions.to(dev), slots,
                                 None if all(n == width for n in lengths) else valid.to(dev))
        return out[torch.arange(R, device=dev), torch.tensor(lengths, device=dev) - 1]

    def layer_forward(self, ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                      slots: torch.Tensor, write: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions [R, Q]; hidden [R, Q, H] -> the layer's output [R, Q, H] (before the final
        norm). Causal over the cache: a query at position p sees entries 0..p of its row."""
        lay, eps = self.layer, self.eps
        x = torch.cat([rms_norm(self.target.embed_tokens(ids), lay["attn_norm"], eps),
                       rms_norm(hidden, lay["hidden_norm"], eps)], dim=-1)
        q, k, v = self.proj.qkv(lay, x, positions)
        ck, cv = self.cache.k[0], self.cache.v[0]
        rows = slots[:, None].expand_as(positions)
        if write is None:
            ck[rows, positions], cv[rows, positions] = k, v
        else:
            ck[rows[write], positions[write]], cv[rows[write], positions[write]] = k[write], v[write]
        kv_end = int(positions.max()) + 1
        R, Q = ids.shape
        mask = None
        if R > 1 or Q > 1:
            mask = torch.arange(kv_end, device=ids.device)[None, None, :] <= positions[:, :, None]
        o = attention(q, ck[slots, :kv_end], cv[slots, :kv_end], mask)
        h = hidden + linear(o.flatten(2), lay["wo"])
        return h + swiglu(rms_norm(h, lay["mlp_norm"], eps), lay["w_gate_up"], lay["w_down"])


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    """A chain stops at an EOS it drafts (reference §5): nothing after it can be accepted."""
    for i, tok in enumerate(row):
        if tok in eos:
            return row[:i + 1]
    return row
