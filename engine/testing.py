"""Small real models for tests and multi-process networks: random weights, real tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.loading import embedded_model_dir


def make_tiny_model(directory: Path, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    family: str = "llama", seed: int = 0, vocab_size: int = 49152,
                    embed_std: float = 1.0, lm_head_std: float | None = None) -> Path:
    """Write a random Llama (or Qwen3) checkpoint with the SmolLM2 tokenizer into `directory`.

    A smaller `vocab_size` uses the tokenizer's first ids only: handy for statistical tests that need
    a distribution with small support. `lm_head_std` unties the LM head (random, that scale): with a
    tied head a random model mostly repeats its input token."""
    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    source = embedded_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    vocab, inter, hd = vocab_size, hidden * 3, hidden // heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.5 / shape[-1] ** 0.5

    w = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * embed_std,
         "model.norm.weight": torch.ones(hidden)}
    if lm_head_std is not None:
        w["lm_head.weight"] = torch.randn(vocab, hidden, generator=g) * lm_head_std
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rand(heads * hd, hidden)
        w[p + "self_attn.k_proj.weight"] = rand(kv_heads * hd, hidden)
        w[p + "self_attn.v_proj.weight"] = rand(kv_heads * hd, hidden)
        w[p + "self_attn.o_proj.weight"] = rand(hidden, heads * hd)
        w[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        w[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        w[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        w[p + "input_layernorm.weight"] = torch.ones(hidden)
        w[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        if family == "qwen3":
            w[p + "self_attn.q_norm.weight"] = torch.ones(hd)
            w[p + "self_attn.k_norm.weight"] = torch.ones(hd)
    arch = {"llama": ("LlamaForCausalLM", "llama"), "qwen3": ("Qwen3ForCausalLM", "qwen3")}[family]
    config = {
        "architectures": [arch[0]], "model_type": arch[1], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hd, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "tie_word_embeddings": lm_head_std is None, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "attention_bias": False, "torch_dtype": "float32",
    }
    save_file(w, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
