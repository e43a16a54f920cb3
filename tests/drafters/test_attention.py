"""The DSpark attention pattern: incremental drafting (own context cache, crop after each block)
equals a from-scratch forward that follows reference §1.2 literally — context as K/V only, a block
query sees context keys j < anchor and its whole block — and nothing at or after the anchor leaks in."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.api import GenerationRequest, SamplingParams
from engine.drafters.checkpoint import load_checkpoint
from engine.drafters.context import PendingContext
from engine.drafters.dspark import DSparkDrafter
from engine.sequence import Sequence
from kernels.ops import apply_rope, rms_norm, swiglu
from tests.drafters.helpers import write_drafter

TOKENS = [11, 305, 42, 7000, 9, 15, 2200, 48, 31, 600, 77, 5, 1234, 88]


def setup(target, tmp_path):
    ckpt = load_checkpoint(write_drafter(target, tmp_path / "d", "dspark", markov_type="rnn"), target)
    drafter = DSparkDrafter(ckpt, target.model, "dspark", 5, max_slots=2, max_context=64)
    m = target.model
    out = m.forward(torch.tensor([TOKENS]), torch.arange(len(TOKENS))[None], torch.tensor([0]),
                    m.new_cache(1, 64), taps=drafter.tap_layers)
    return drafter, out.taps[0]


def reference_block(drafter, feats: torch.Tensor, anchor: int) -> torch.Tensor:
    """Hidden states of the block anchored at position `anchor`, from scratch (reference §1.2)."""
    c, m = drafter.config, drafter.target
    ctx = rms_norm(feats @ drafter.fc.t(), drafter.hidden_norm, c.rms_norm_eps)   # all positions
    ids = torch.tensor([TOKENS[anchor]] + [c.mask_token_id] * (drafter.block - 1))
    h = m.embed[ids][None]
    pos = torch.cat([torch.arange(len(TOKENS)), anchor + torch.arange(drafter.block)])
    n = len(TOKENS)
    # context key j visible iff j < anchor; every block key visible (bidirectional)
    visible = torch.cat([torch.arange(n) < anchor, torch.ones(drafter.block, dtype=torch.bool)])
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.dim_head
    for layer in drafter.layers:
        x = rms_norm(h, layer["attn_norm"], c.rms_norm_eps)
        wq, wk, wv = layer["wqkv"].w_t.split([nh * hd, nkv * hd, nkv * hd], dim=1)   # [in, out]
        q = (x @ wq).view(1, -1, nh, hd)
        kv_in = torch.cat([ctx[None], x], dim=1)          # the context is never run through the layer
        k = (kv_in @ wk).view(1, -1, nkv, hd)
        v = (kv_in @ wv).view(1, -1, nkv, hd)
        if "q_norm" in layer:
            q, k = rms_norm(q, layer["q_norm"], c.rms_norm_eps), rms_norm(k, layer["k_norm"], c.rms_norm_eps)
        q = apply_rope(q, m.cos[pos[n:]][None], m.sin[pos[n:]][None])
        k = apply_rope(k, m.cos[pos][None], m.sin[pos][None])
        k, v = k.repeat_interleave(nh // nkv, dim=2), v.repeat_interleave(nh // nkv, dim=2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=visible[None, None, None, :])
        h = h + o.transpose(1, 2).flatten(2) @ layer["wo"].w_t
        h = h + swiglu(rms_norm(h, layer["mlp_norm"], c.rms_norm_eps), layer["w_gate_up"], layer["w_down"])
    return rms_norm(h, drafter.norm, c.rms_norm_eps)[0]


def sequence(anchor: int, slot: int = 0) -> Sequence:
    req = GenerationRequest("r", tuple(TOKENS[:anchor]), SamplingParams())
    return Sequence(request=req, generator=torch.Generator(), tokens=TOKENS[:anchor + 1], prompt_len=anchor,
                    slot=slot, kv_len=anchor)


def test_incremental_blocks_match_the_reference_forward(target, tmp_path):
    drafter, feats = setup(target, tmp_path)
    seq = sequence(4)
    drafter.start(seq, feats[:4])
    for anchor in (4, 6, 7, 11):       # rounds that accepted 1, 0 and 3 drafts
        seq.tokens, seq.kv_len = TOKENS[:anchor + 1], anchor
        st = seq.drafter_state
        if not st.chunks:
            accepted = anchor - st.cached - 1
            drafter.commit(seq, feats[st.cached:anchor], accepted, accepted)
        got = drafter.draft_block([seq])[0]
        assert torch.allclose(got, reference_block(drafter, feats, anchor), atol=1e-5), anchor


def test_nothing_at_or_after_the_anchor_is_seen(target, tmp_path):
    drafter, feats = setup(target, tmp_path)
    anchor = 8
    seq = sequence(anchor)
    seq.drafter_state = PendingContext([feats[:anchor]])
    clean = drafter.draft_block([seq])
    # garbage in the cache at and after the anchor (stale blocks, other rounds) changes nothing
    drafter.cache.k[:, 0, anchor:] = torch.randn_like(drafter.cache.k[:, 0, anchor:]) * 10
    drafter.cache.v[:, 0, anchor:] = torch.randn_like(drafter.cache.v[:, 0, anchor:]) * 10
    seq.drafter_state = PendingContext([feats[:anchor]])
    assert torch.allclose(drafter.draft_block([seq]), clean, atol=1e-6)
    # a future context feature (position >= anchor) never enters; the last real one does matter
    for pos, should_change in ((anchor, False), (anchor - 1, True)):
        changed = feats.clone()
        changed[pos] += 5.0
        seq.drafter_state = PendingContext([changed[:anchor]])
        moved = not torch.allclose(drafter.draft_block([seq]), clean, atol=1e-4)
        assert moved == should_change, pos


def test_batched_rows_match_single_rows(target, tmp_path):
    drafter, feats = setup(target, tmp_path)
    rows = [(5, 0), (10, 1)]
    singles = []
    for anchor, slot in rows:
        seq = sequence(anchor, slot)
        seq.drafter_state = PendingContext([feats[:anchor]])
        singles.append(drafter.draft_block([seq])[0])
    seqs = [sequence(a, s) for a, s in rows]
    for seq, (anchor, _) in zip(seqs, rows):
        seq.drafter_state = PendingContext([feats[:anchor]])
    batched = drafter.draft_block(seqs)
    for r in range(2):
        assert torch.allclose(batched[r], singles[r], atol=1e-5)
