"""Peers to measure against on the same model and prompts: transformers' own `generate()`,
greedy (`hf-greedy`) and with its prompt-lookup decoding (`hf-pld`)."""

from __future__ import annotations

import torch


class HfPeer:
    def __init__(self, path, dtype: torch.dtype, prompt_lookup_tokens: int | None, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        self.model.eval()
        self.prompt_lookup_tokens = prompt_lookup_tokens

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...]) -> list[int]:
        ids = torch.tensor([prompt_ids], device=self.model.device)
        kwargs = {"prompt_lookup_num_tokens": self.prompt_lookup_tokens} if self.prompt_lookup_tokens else {}
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids),
                                  pad_token_id=eos_ids[0], **kwargs)
        return out[0, len(prompt_ids):].tolist()
