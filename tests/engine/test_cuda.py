"""The engine's CUDA paths (run on a GPU machine; skipped elsewhere): fp32 greedy outputs equal the
CPU's, and every drafter and scheduler stays lossless on the device, with a draft vocabulary too."""

from __future__ import annotations

import pytest
import torch

from engine.build import build_engine
from engine.config import EngineConfig
from engine.drafters.checkpoint import write_draft_vocab
from engine.loading import load_target
from tests.drafters.helpers import make_target, request, write_drafter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPTS = [list(range(5, 25)), [101, 7, 3000, 42, 42, 9, 17], [9, 9, 9, 9], list(range(300, 340))]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("cuda-target") / "t", "llama")


def outputs(target_dir, device: str, method: str = "ar", drafter=None, **kw) -> list[tuple[int, ...]]:
    engine = build_engine(EngineConfig(model=str(target_dir), method=method, drafter=drafter and str(drafter),
                                       device=device, max_batch=4, max_context=128, **kw))
    for i, p in enumerate(PROMPTS):
        engine.add(request(p, max_new_tokens=24, seed=i))
    done = {}
    while engine.has_work:
        done.update({e.request_id: e.output_ids for e in engine.step()[0] if hasattr(e, "finish_reason")})
    return sorted(done.values())


def test_plain_decoding_on_cuda_equals_cpu(target_dir):
    assert outputs(target_dir, "cuda") == outputs(target_dir, "cpu")


@pytest.mark.parametrize("kind,scheduler", [("dspark", "static"), ("dspark", "sync"), ("dspark", "async"),
                                            ("dflash", "static"), ("eagle3", "static")])
def test_drafting_on_cuda_is_lossless(target_dir, tmp_path, kind, scheduler):
    drafter = write_drafter(load_target(str(target_dir), torch.float32), tmp_path / kind, kind)
    assert outputs(target_dir, "cuda", kind, drafter, scheduler=scheduler) == outputs(target_dir, "cuda")


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_drafting_from_a_draft_vocabulary_on_cuda_is_lossless(target_dir, tmp_path, kind):
    """Even ids as the frequent subset; odd context tokens join per request (batch of 4, so rows
    mask each other's), greedy."""
    target = load_target(str(target_dir), torch.float32)
    drafter = write_drafter(target, tmp_path / kind, kind)
    write_draft_vocab(drafter, torch.arange(0, target.model.args.vocab_size, 2), {})
    assert outputs(target_dir, "cuda", kind, drafter) == outputs(target_dir, "cuda")
