"""Randomly initialised drafters in the DeepSpec format, for a given target (training starts here).

The config is a deep copy of the target's plus the drafter fields of §2.1 / §2.4; the state dict
has every tensor of §2.2 / §2.4 except the embedding and LM head, which stay the target's
(`shares_target_embeddings`).

Mask token: a target whose embedding has rows the tokenizer never emits (Qwen3: 151669, §1.2) uses
the first such row. SmolLM2-style vocabularies have none, so we use `<gh_stars>` (a GitHub-metadata
special token of the StarCoder-era pretraining data that chat text never contains); a target with
neither is refused.
"""

from __future__ import annotations

import copy

import torch

from engine.drafters.checkpoint import CheckpointError, expected_shapes, parse_config
from engine.loading import LoadedTarget

FALLBACK_MASK_TOKEN = "<gh_stars>"
KINDS = ("dspark", "dflash", "eagle3")


def pick_mask_token(target: LoadedTarget) -> int:
    vocab, tokenizer = target.model.args.vocab_size, target.tokenizer
    if len(tokenizer) < vocab:
        return len(tokenizer)
    token_id = tokenizer.convert_tokens_to_ids(FALLBACK_MASK_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise CheckpointError(f"{target.model_id}: no unused embedding row and no {FALLBACK_MASK_TOKEN} "
                              "token to use as the mask token")
    return int(token_id)


def default_layer_ids(num_layers: int, count: int = 5) -> list[int]:
    """Evenly spaced taps from layer 1 to the third-last (Qwen3-8B, 36 layers: [1, 9, 17, 25, 33])."""
    last = max(num_layers - 3, 1)
    ids = sorted({round(1 + i * (last - 1) / max(count - 1, 1)) for i in range(count)})
    return [i for i in ids if i <= num_layers - 2] or [0]


def init_drafter(target: LoadedTarget, kind: str, layers: int = 5, markov_rank: int = 256,
                 markov_type: str = "vanilla", block_size: int = 7, target_layer_ids: list[int] | None = None,
                 seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """kind: dspark (Markov + confidence heads), dflash (neither) or eagle3 (one layer, TTT)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    args = target.model.args
    family = {"qwen3": "Qwen3", "llama": "Llama"}.get(args.family)
    if family is None:
        raise CheckpointError(f"drafters for {args.family} targets are not supported (Llama, Qwen3 only)")
    ids = list(target_layer_ids) if target_layer_ids is not None else default_layer_ids(args.num_layers)
    config = copy.deepcopy(target.hf_config.to_dict())
    config.update(num_target_layers=args.num_layers, target_layer_ids=ids, tie_word_embeddings=False,
                  target_model_name_or_path=target.model_id, shares_target_embeddings=True)
    if kind == "eagle3":
        config.update(architectures=[f"{family}Eagle3Model"], num_hidden_layers=1, draft_num_hidden_layers=1,
                      ttt_length=block_size, step_loss_decay=0.8, layer_types=["full_attention"])
    else:
        rank = markov_rank if kind == "dspark" else 0
        config.update(architectures=[f"{family}DSparkModel"], num_hidden_layers=layers, block_size=block_size,
                      mask_token_id=pick_mask_token(target), num_anchors=512, markov_rank=rank,
                      enable_confidence_head=kind == "dspark", layer_types=["full_attention"] * layers)
        if kind == "dspark":
            config.update(markov_head_type=markov_type if rank else None, confidence_head_with_markov=rank > 0)
            if not rank:
                config.pop("markov_head_type")
    parsed = parse_config(config, f"new {kind} drafter")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(parsed).items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            state[name] = torch.zeros(shape)
        else:  # fan-in scaled, like nn.Linear's default
            state[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return config, state
