"""The trainable drafters compute what the inference drafters compute (same weights, same names)."""

from __future__ import annotations

import pytest
import torch

from engine.api import RequestStats
from engine.drafters.checkpoint import load_checkpoint, save_checkpoint
from engine.drafters.dspark import DSparkDrafter
from engine.drafters.eagle3 import Eagle3Drafter
from engine.drafters.init import init_drafter
from engine.sequence import Sequence
from engine.train.trainer import build_module
from engine.drafters.checkpoint import parse_config
from kernels.ops import rms_norm
from tests.drafters.helpers import request


def _sequence(tokens: list[int]) -> Sequence:
    return Sequence(request=request(tokens[:1]), generator=torch.Generator(), tokens=list(tokens),
                    prompt_len=1, slot=0, kv_len=len(tokens) - 1, stats=RequestStats())


def _module_and_checkpoint(target, tmp_path, kind, taps, **kw):
    config, state = init_drafter(target, kind, layers=2, markov_rank=16, block_size=5, target_layer_ids=taps,
                                 seed=3, **kw)
    module = build_module(parse_config(config, "test"), state)
    with torch.no_grad():                       # non-trivial norms, so a missed norm shows
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    save_checkpoint(tmp_path, config, module.state_dict())
    return module, load_checkpoint(tmp_path, target)


@pytest.mark.parametrize("anchor", [0, 1, 17])
def test_dspark_block_hidden_matches_the_inference_drafter(target, sequences, tmp_path, anchor):
    taps = [-1, 1]
    module, ckpt = _module_and_checkpoint(target, tmp_path, "dspark", taps)
    seq = sequences[0]
    ids = seq.input_ids
    out = target.model.forward(ids[None], torch.arange(len(ids))[None], torch.tensor([0]),
                               target.model.new_cache(1, len(ids)), taps=tuple(taps))
    with torch.no_grad():
        trained = module.block_hidden(target.model, out.taps[0], ids, torch.tensor([anchor]))[0]
    drafter = DSparkDrafter(ckpt, target.model, "dspark", 5, max_slots=1, max_context=len(ids) + 8)
    s = _sequence(ids[:anchor + 1].tolist())
    drafter.start(s, out.taps[0, :anchor])
    torch.testing.assert_close(trained, drafter.draft_block([s])[0], atol=1e-4, rtol=1e-4)


def test_eagle3_ttt_steps_match_the_inference_drafter(target, sequences, tmp_path):
    taps = [0, 2]
    module, ckpt = _module_and_checkpoint(target, tmp_path, "eagle3", taps)
    ids = sequences[0].input_ids[:40]
    out = target.model.forward(ids[None], torch.arange(len(ids))[None], torch.tensor([0]),
                               target.model.new_cache(1, len(ids)), taps=tuple(taps))
    with torch.no_grad():
        steps = module.ttt(target.model, out.taps[0], ids, 3)
    i = 20                                            # context features 0..i paired with tokens 1..i+1
    drafter = Eagle3Drafter(ckpt, target.model, 5, max_slots=1, max_context=64, eos_token_ids=(2,))
    s = _sequence(ids[:i + 2].tolist())
    drafter.start(s, out.taps[0, :i + 1])
    slots = torch.tensor([0])
    g = drafter.extend([s], slots)
    torch.testing.assert_close(steps[0][i], rms_norm(g, drafter.norm, drafter.eps)[0], atol=1e-4, rtol=1e-4)
    for step in (1, 2):                              # teacher forcing: the true next token, at i + step
        g = drafter.layer_forward(ids[i + 1 + step].view(1, 1), g[:, None], torch.tensor([[i + step]]), slots)[:, 0]
        torch.testing.assert_close(steps[step][i], rms_norm(g, drafter.norm, drafter.eps)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("markov_type", ["vanilla", "gated", "rnn"])
def test_markov_and_confidence_heads_match_the_inference_drafter(target, sequences, tmp_path, markov_type):
    taps, anchor = [-1, 1], 9
    module, ckpt = _module_and_checkpoint(target, tmp_path, "dspark", taps, markov_type=markov_type)
    ids = sequences[0].input_ids
    out = target.model.forward(ids[None], torch.arange(len(ids))[None], torch.tensor([0]),
                               target.model.new_cache(1, len(ids)), taps=tuple(taps))
    drafter = DSparkDrafter(ckpt, target.model, "dspark", 5, max_slots=1, max_context=len(ids) + 8)
    s = _sequence(ids[:anchor + 1].tolist())
    drafter.start(s, out.taps[0, :anchor])
    hidden = drafter.draft_block([s])
    prev = ids[anchor:anchor + 5][None]                      # teacher forcing: anchor, y_0 .. y_3
    vocab = torch.arange(target.model.args.vocab_size)
    with torch.no_grad():
        logits, conf = module.heads(target.model, hidden, prev, vocab)
    base, state = target.model.logits(hidden), drafter.markov.initial_state(1)
    for k in range(5):
        bias, state = drafter.markov.step_bias(hidden[:, k], prev[:, k], state)
        torch.testing.assert_close(logits[0, k], (base[:, k] + bias)[0], atol=1e-4, rtol=1e-4)
    expected = drafter.confidence.logits(hidden, drafter.markov.prev_features(prev))   # uncalibrated
    torch.testing.assert_close(conf, expected, atol=1e-5, rtol=1e-5)
