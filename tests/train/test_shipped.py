"""The shipped DSpark drafter: loads for the embedded model, is the default for --method dspark, and
keeps greedy decoding exact."""

from __future__ import annotations

import pytest
import torch

from engine.build import SHIPPED_DRAFTERS, build_engine
from engine.config import EMBEDDED_MODEL, EngineConfig
from engine.drafters.checkpoint import load_checkpoint
from engine.loading import load_target
from tests.drafters.helpers import request

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_target(EMBEDDED_MODEL, torch.float32)


def test_shipped_drafter_is_small_and_complete(smollm2):
    ckpt = load_checkpoint(SHIPPED_DRAFTERS[EMBEDDED_MODEL], smollm2)
    c = ckpt.config
    assert c.kind == "dspark" and c.markov_rank > 0 and c.enable_confidence_head
    assert c.shares_target_embeddings and "embed_tokens.weight" not in ckpt.weights
    assert c.confidence_temperatures is not None and len(c.confidence_temperatures) == c.block
    assert c.confidence_offsets is not None and len(c.confidence_offsets) == c.block
    for suffix in ("", "_greedy"):   # both triples carry the request-history term (calibrate)
        assert len(getattr(c, "confidence_history_weights" + suffix)) == c.block
        assert 0 < getattr(c, "confidence_history_prior" + suffix) < 1
    assert "sources" in c.model_dump()["training"]["data"]
    assert sum(f.stat().st_size for f in ckpt.path.iterdir()) < 40e6
    # a frequent-token draft vocabulary: its LM head is a third of the target's (docs/training.md)
    assert ckpt.draft_vocab is not None and len(ckpt.draft_vocab) == 16384


def test_method_dspark_defaults_to_it_and_stays_exact(smollm2):
    prompt = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Write a Python function that "
                                                     "returns the sum of a list."}], add_generation_prompt=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])

    def run(method):
        engine = build_engine(EngineConfig(method=method, max_batch=1, max_context=512), smollm2)
        return engine, engine.generate(request(prompt, max_new_tokens=24))

    _, plain = run("ar")
    engine, spec = run("dspark")
    assert engine.info.drafter_digest == load_checkpoint(SHIPPED_DRAFTERS[EMBEDDED_MODEL], smollm2).digest
    assert spec.output_ids == plain.output_ids
    assert spec.stats.rounds > 0
