"""The DSpark drafter (reference §1, §4.3) and DFlash, the same backbone without the two heads.

One round, batched over every active request:
  1. draft_block: the tapped target features of the newly committed positions are fused
     (hidden_norm(fc(x))) and projected into each draft layer's K/V cache, never run through the
     layers; then the block [anchor, MASK x (B-1)] at absolute positions anchor..anchor+B-1 attends to
     the cached context (positions < anchor) and bidirectionally to itself. Its K/V entries are
     dropped afterwards ("crop to start"): the cache only ever holds context.
  2. sample_block: left-to-right sampling through the Markov head; q = the corrected distribution.
  3. confidence: c_k from [h_k ; W1[x_{k-1}]], calibrated with the draft's own log-odds of x_k,
     slot by slot inside step 2, so that Algorithm 1's horizon (engine/prefix_scheduler.py) can end
     the block after the last slot it could verify.
"""

from __future__ import annotations

import torch

from engine.drafters.base import Drafter, Horizon, Proposal
from engine.drafters.checkpoint import DrafterCheckpoint
from engine.drafters.confidence import ConfidenceHead, ConfidenceHistory
from engine.drafters.context import PendingContext
from engine.drafters.layers import DraftCache, Projector, fuse_layer
from engine.drafters.markov import MarkovHead, sample_block
from engine.drafters.vocab import DraftVocab
from engine.model import TargetModel
from engine.sequence import Sequence
from kernels.ops import attention, linear, rms_norm, swiglu


class DSparkDrafter(Drafter):
    def __init__(self, checkpoint: DrafterCheckpoint, target: TargetModel, name: str, block_size: int,
                 max_slots: int, max_context: int):
        c = checkpoint.config
        w = {k: v.to(device=target.device, dtype=target.dtype) for k, v in checkpoint.weights.items()}
        self.name, self.config, self.target = name, c, target
        self.block = c.block                        # the block the drafter was trained on (input length)
        self.block_size = min(block_size, c.block)  # tokens proposed: a prefix of the block
        self.tap_layers = tuple(c.target_layer_ids)
        self.digest = checkpoint.digest
        self.mask_token_id = c.mask_token_id
        self.eps = c.rms_norm_eps
        self.fc, self.hidden_norm, self.norm = w["fc.weight"], w["hidden_norm.weight"], w["norm.weight"]
        self.layers = [fuse_layer(w, f"layers.{i}.", c.family == "qwen3", context_kv=True)
                       for i in range(c.num_hidden_layers)]
        self.proj = Projector(c, target.cos, target.sin)
        self.cache = DraftCache(c, max_slots, max_context + self.block + 2, target.dtype, target.device)
        self.vocab = DraftVocab.for_target(target, checkpoint.draft_vocab)
        self.markov = MarkovHead(c.markov_head_type, w, self.vocab) if c.markov_rank else None
        self.confidence = (ConfidenceHead(w, c.confidence_head_with_markov, c.block,
                                          (c.confidence_temperatures, c.confidence_offsets,
                                           c.confidence_draft_weights),
                                          (c.confidence_temperatures_greedy, c.confidence_offsets_greedy,
                                           c.confidence_draft_weights_greedy),
                                          (c.confidence_history_weights, c.confidence_history_prior),
                                          (c.confidence_history_weights_greedy, c.confidence_history_prior_greedy))
                           if c.enable_confidence_head else None)
        self.histories: dict[str, ConfidenceHistory] = {}   # request id -> its record at position 1

    # ---- per-request state -----------------------------------------------------------------
    def start(self, seq: Sequence, prompt_features: torch.Tensor | None) -> None:
        seq.drafter_state = PendingContext()
        seq.drafter_state.add(prompt_features)
        self.histories[seq.request_id] = ConfidenceHistory()

    def commit(self, seq: Sequence, features: torch.Tensor | None, verified: int, accepted: int) -> None:
        seq.drafter_state.add(features)
        self.histories[seq.request_id].settle(verified, accepted)

    def release(self, seq: Sequence) -> None:
        seq.drafter_state = None
        self.histories.pop(seq.request_id, None)
        self.vocab.release(seq)

    # ---- the round -------------------------------------------------------------------------
    def propose(self, seqs: list[Sequence], horizon: Horizon | None = None) -> Proposal:
        self.vocab.cover(seqs)
        hidden = self.draft_block(seqs)[:, :self.block_size]
        base_logits = self.vocab.logits(hidden)
        anchors = torch.tensor([seq.tokens[-1] for seq in seqs], device=self.target.device)
        if self.confidence is None:
            tokens, probs, _ = sample_block(base_logits, hidden, anchors, self.markov, seqs, self.block_size,
                                            self.vocab)
            return Proposal(tokens=tokens.tolist(), probs=probs)
        is_greedy = [seq.request.sampling.greedy for seq in seqs]
        greedy = torch.tensor(is_greedy, device=self.target.device)
        records = [self.histories[seq.request_id] for seq in seqs]
        history = self.confidence.history(records, is_greedy)
        # per slot [R, 4]: c_k, the head's inputs (z_k, u_k), and at slot 0 the history-free c_1 (c_k elsewhere)
        slots: list[torch.Tensor] = []

        def confidence_after(k: int, prev: torch.Tensor, logodds: torch.Tensor) -> bool:
            # c_k as soon as slot k is drafted, so that the horizon can end the block after it
            z = self.confidence.logits(hidden[:, k], self.markov.prev_features(prev) if self.confidence.with_markov
                                       else None)
            c = self.confidence.scale(z[:, None], logodds[:, None], greedy, first=k, history=history)[:, 0]
            # the request's record adds the history-free c_1, so that h measures the (z, u) scaling alone
            plain = c if history is None or k > 0 else self.confidence.scale(z[:, None], logodds[:, None], greedy)[:, 0]
            slots.append(torch.stack([c, z, logodds, plain], dim=-1))
            return horizon is None or horizon.more(seqs, k + 1, c)

        tokens, probs, _ = sample_block(base_logits, hidden, anchors, self.markov, seqs, self.block_size, self.vocab,
                                        with_logodds=True, after_slot=confidence_after)
        # confidences and the head's inputs (for calibration records) come to the host in one copy
        host = torch.stack(slots, dim=1).cpu()
        for record, plain in zip(records, host[:, 0, 3].tolist()):
            record.pending = plain
        return Proposal(tokens=tokens.tolist(), probs=probs, confidence=list(host[..., 0]),
                        confidence_inputs=list(host[..., 1:3]))

    @torch.inference_mode()
    def draft_block(self, seqs: list[Sequence]) -> torch.Tensor:
        """Ingest pending context, run the anchor-first block: post-norm hidden states [R, B, H]."""
        dev, B, R = self.target.device, self.block, len(seqs)
        ctx, ctx_slots, ctx_pos = self._take_context(seqs)
        slots = torch.tensor([seq.slot for seq in seqs], device=dev)
        starts = torch.tensor([seq.kv_len for seq in seqs], device=dev)      # anchor positions
        ids = torch.full((R, B), self.mask_token_id, device=dev)
        ids[:, 0] = torch.tensor([seq.tokens[-1] for seq in seqs], device=dev)
        positions = starts[:, None] + torch.arange(B, device=dev)
        kv_end = int(starts.max()) + B
        # Keys at or beyond a row's anchor + B are stale entries of other rounds or rows' padding.
        mask = None
        if R > 1:
            mask = (torch.arange(kv_end, device=dev)[None, None, :] < (starts + B)[:, None, None]).expand(R, B, kv_end)
        h = self.target.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            ck, cv = self.cache.k[i], self.cache.v[i]
            if ctx is not None:
                k, v = self.proj.kv(layer, ctx, ctx_pos)
                ck[ctx_slots, ctx_pos], cv[ctx_slots, ctx_pos] = k, v
            q, k, v = self.proj.qkv(layer, rms_norm(h, layer["attn_norm"], self.eps), positions)
            ck[slots[:, None], positions], cv[slots[:, None], positions] = k, v
            o = attention(q, ck[slots, :kv_end], cv[slots, :kv_end], mask)
            h = h + linear(o.flatten(2), layer["wo"])
            h = h + swiglu(rms_norm(h, layer["mlp_norm"], self.eps), layer["w_gate_up"], layer["w_down"])
        return rms_norm(h, self.norm, self.eps)

    def _take_context(self, seqs: list[Sequence]):
        """All rows' pending features, flattened: fused context [N, H], cache slots [N], positions [N]."""
        feats, slots, positions = [], [], []
        for seq in seqs:
            pending, start = seq.drafter_state.take(seq.kv_len)
            if pending is not None:
                n = pending.shape[0]
                feats.append(pending)
                slots.append(torch.full((n,), seq.slot))
                positions.append(torch.arange(start, start + n))
        if not feats:
            return None, None, None
        dev = self.target.device
        x = torch.cat(feats).to(self.fc.dtype)
        ctx = rms_norm(x @ self.fc.t(), self.hidden_norm, self.eps)
        return ctx, torch.cat(slots).to(dev), torch.cat(positions).to(dev)
