"""Bad checkpoints and bad requests get clear errors and leave nothing half-written."""

import json
import shutil

import pytest
import torch

from engine.api import GenerationRequest, GenerationResult, RequestRejected, SamplingParams
from engine.build import build_engine
from engine.config import EngineConfig
from engine.loading import ModelLoadError, load_target


def test_unknown_model_path():
    with pytest.raises(ModelLoadError, match="not found"):
        load_target("/nonexistent/model/dir", torch.float32)


@pytest.mark.parametrize("device,message", [
    ("gpu", "not a torch device"), ("meta", "only cpu and cuda"),
    pytest.param("cuda", "is not available: CUDA devices visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ("cuda:64", "is not available: CUDA devices visible"),
])
def test_unusable_device_is_refused_before_loading(tiny_llama, device, message):
    with pytest.raises(ModelLoadError, match=message):
        load_target(str(tiny_llama), torch.float32, device)


def test_hub_id_not_cached_is_refused_without_download():
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_target("nobody-here/no-such-model-xyz", torch.float32)


def test_corrupt_safetensors(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    (bad / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_target(str(bad), torch.float32)


def test_other_architecture(tiny_llama, tmp_path):
    bad = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    config["model_type"] = "gpt2"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel is not supported"):
        load_target(str(bad), torch.float32)


def test_weights_of_another_shape(tiny_llama, tmp_path):
    bad = tmp_path / "wide"
    shutil.copytree(tiny_llama, bad)
    config = json.loads((bad / "config.json").read_text())
    config["hidden_size"] = 128
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="has shape"):
        load_target(str(bad), torch.float32)


def test_file_instead_of_directory(tiny_llama):
    with pytest.raises(ModelLoadError, match="is a file"):
        load_target(str(tiny_llama / "config.json"), torch.float32)


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama):
    return build_engine(EngineConfig(model=str(tiny_llama), max_context=64, max_batch=2, max_queue=2))


@pytest.mark.parametrize("sampling, reason", [
    (SamplingParams(max_new_tokens=0), "bad_sampling"),
    (SamplingParams(max_new_tokens=10**9), "too_long"),
    (SamplingParams(max_new_tokens=60), "too_long"),  # 10-token prompt + 60 > 64
    (SamplingParams(temperature=-1.0), "bad_sampling"),
    (SamplingParams(temperature=float("nan")), "bad_sampling"),
    (SamplingParams(top_p=0.0), "bad_sampling"),
])
def test_bad_requests_are_rejected(tiny_engine, sampling, reason):
    with pytest.raises(RequestRejected) as err:
        tiny_engine.add(GenerationRequest("r", tuple(range(10)), sampling))
    assert err.value.reason == reason
    assert not tiny_engine.has_work


def test_prompt_tokens_outside_vocab(tiny_engine):
    with pytest.raises(RequestRejected, match="token ids"):
        tiny_engine.add(GenerationRequest("r", (1, 2, 10**6), SamplingParams(max_new_tokens=4)))


def test_full_queue_refuses(tiny_engine):
    # Two slots, then two waiting: the fifth request is refused, before and after a step.
    for i in range(4):
        tiny_engine.add(GenerationRequest(f"q{i}", (1, 2, 3), SamplingParams(max_new_tokens=8)))
    for _ in range(2):
        with pytest.raises(RequestRejected) as err:
            tiny_engine.add(GenerationRequest("q4", (1, 2, 3), SamplingParams(max_new_tokens=2)))
        assert err.value.reason == "queue_full"
        tiny_engine.step()
    while tiny_engine.has_work:
        tiny_engine.step()


def test_a_queue_of_0_serves_while_a_slot_is_free(tiny_llama):
    engine = build_engine(EngineConfig(model=str(tiny_llama), max_context=64, max_batch=2, max_queue=0))
    for i in range(2):
        engine.add(GenerationRequest(f"q{i}", (1, 2, 3), SamplingParams(max_new_tokens=8)))
    with pytest.raises(RequestRejected, match="every slot is taken"):
        engine.add(GenerationRequest("q2", (1, 2, 3), SamplingParams(max_new_tokens=2)))
    finished = []
    while engine.has_work:
        finished += [e.request_id for e in engine.step()[0] if isinstance(e, GenerationResult)]
    assert sorted(finished) == ["q0", "q1"]


def test_a_kv_cache_past_the_free_memory_is_refused_before_it_is_allocated(tmp_path):
    """Torch would allocate it lazily and the OOM killer would end the node under load."""
    from engine.memory import available_bytes, kv_cache_bytes, kv_cache_len
    from engine.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "deep", layers=64, kv_heads=4)     # 32 KiB of K/V a position
    target = load_target(str(model), torch.float32)
    free = available_bytes(target.model.device)
    config = EngineConfig(model=str(model), method="ar", max_batch=1024, max_context=4096)
    need = kv_cache_bytes(target.model.args, 1024, kv_cache_len(config), torch.float32)
    if free is None or need <= free:
        pytest.skip(f"this machine has {free} bytes free, more than a {need}-byte cache")
    with pytest.raises(ModelLoadError, match=r"KV cache for max_batch 1024 x max_context 4096 needs \d+\.\d GiB"
                                             r" and cpu has \d+\.\d GiB free; lower max_batch or max_context"):
        build_engine(config, target)


def test_kv_cache_bytes_are_the_cache_the_engine_allocates(tiny_llama):
    from engine.memory import kv_cache_bytes, kv_cache_len

    config = EngineConfig(model=str(tiny_llama), method="ar", max_batch=3, max_context=64)
    engine = build_engine(config)
    cache = engine.cache
    assert cache.k.nbytes + cache.v.nbytes == kv_cache_bytes(engine.model.args, 3, kv_cache_len(config), torch.float32)
