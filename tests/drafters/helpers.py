"""Tiny real targets (random Llama / Qwen3 checkpoints with the SmolLM2 tokenizer) and drafters for them.

make_tiny_model's tied embedding (std 1) makes every token predict itself; an untied random LM head
and a smaller embedding give varied, context-dependent output, which is what a drafter test needs.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.api import GenerationRequest, SamplingParams
from engine.drafters.checkpoint import save_checkpoint
from engine.drafters.init import init_drafter
from engine.loading import LoadedTarget
from engine.testing import make_tiny_model

EMBED_SCALE = 1.0
LM_HEAD_STD = 0.4


def make_target(directory: Path, family: str, layers: int = 4) -> Path:
    path = make_tiny_model(directory, layers=layers, family=family, seed=3)
    config = json.loads((path / "config.json").read_text())
    if config["tie_word_embeddings"]:
        weights = load_file(path / "model.safetensors")
        g = torch.Generator().manual_seed(5)
        weights["model.embed_tokens.weight"] *= EMBED_SCALE
        weights["lm_head.weight"] = torch.randn(weights["model.embed_tokens.weight"].shape, generator=g) * LM_HEAD_STD
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        config["tie_word_embeddings"] = False
        (path / "config.json").write_text(json.dumps(config))
    return path


def write_drafter(target: LoadedTarget, directory: Path, kind: str, **kwargs) -> Path:
    """A random drafter saved in the DeepSpec format (taps [-1, 1] or [0, 2] for EAGLE-3)."""
    options = dict(layers=2, markov_rank=16, markov_type="vanilla", block_size=5,
                   target_layer_ids=[0, 2] if kind == "eagle3" else [-1, 1], seed=7)
    options.update(kwargs)
    config, state = init_drafter(target, kind, **options)
    return save_checkpoint(directory, config, state)


def request(prompt: list[int], temperature: float = 0.0, max_new_tokens: int = 24, seed: int | None = 0,
            top_p: float = 1.0) -> GenerationRequest:
    return GenerationRequest(uuid.uuid4().hex, tuple(prompt),
                             SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                            seed=seed))


def aligned_state(target: LoadedTarget, config: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make a random drafter agree with the target often, so rounds accept several tokens.

    The tiny target's next token is mostly a function of the current one. Zeroing the layers'
    output projections makes each block slot's hidden state its input embedding, so slot 0 (the
    anchor) predicts like the target; a Markov head of rank H with W1 = E (scaled) and W2 = the LM
    head adds the same bigram guess for later slots. EAGLE-3's fc passes the first tapped layer.
    """
    state = dict(state)
    for name in state:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = torch.zeros_like(state[name])
    H = config["hidden_size"]
    embed, head = target.model.embed.float(), target.model.lm_head.float()
    if config.get("markov_rank") == H:
        state["markov_head.markov_w1.weight"] = embed * (3.0 / float(embed.std()))
        state["markov_head.markov_w2.weight"] = head.clone()
    if config["architectures"][0].endswith("Eagle3Model"):
        fc = torch.zeros_like(state["fc.weight"])
        fc[:, :H] = torch.eye(H)
        state["fc.weight"] = fc
    return state


def logged_proposals(engine) -> dict[tuple[str, int], list[int]]:
    """(request, tokens so far) -> what the drafter proposed there, for every request it drafted for."""
    log, propose = {}, engine.drafter.propose

    def logging_propose(seqs, horizon=None):
        proposal = propose(seqs, horizon)
        for seq, tokens in zip(seqs, proposal.tokens):
            log[(seq.request.prompt_ids, len(seq.tokens))] = tokens
        return proposal
    engine.drafter.propose = logging_propose
    return log
