"""Training on a CUDA device (run on a GPU machine; skipped elsewhere): the same anchors and, to
float tolerance, the same losses and weights as on the CPU (close losses under bf16 autocast); the
CLI end to end on the device."""

from __future__ import annotations

import json

import pytest
import torch

from engine.build import build_engine
from engine.config import EngineConfig
from engine.loading import load_target
from engine.train.trainer import train
from node.cli import main
from tests.drafters.helpers import request
from tests.train.test_training import fresh, settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_on_cuda_follows_cpu(target, sequences, tmp_path):
    _, on_cpu = fresh(target)
    _, on_gpu = fresh(target)
    cpu = train(on_cpu, target.model, sequences, settings(steps=4), tmp_path / "cpu")
    gpu_target = load_target(str(target.path), torch.float32, "cuda")
    gpu = train(on_gpu, gpu_target.model, sequences, settings(steps=4, device="cuda"), tmp_path / "gpu")
    assert [h["loss"] for h in gpu.history] == pytest.approx([h["loss"] for h in cpu.history], rel=1e-3)
    for (name, a), b in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values()):
        assert torch.allclose(a, b.cpu(), rtol=1e-3, atol=1e-5), name


def test_bf16_training_on_cuda_follows_cpu_bf16_loosely(target, sequences, tmp_path):
    """Autocast on both devices: bf16 products differ between kernels, so only the losses' trend
    and scale are compared."""
    _, on_cpu = fresh(target)
    _, on_gpu = fresh(target)
    cpu = train(on_cpu, target.model, sequences, settings(steps=4, dtype="bfloat16"), tmp_path / "cpu")
    gpu_target = load_target(str(target.path), torch.float32, "cuda")
    gpu = train(on_gpu, gpu_target.model, sequences, settings(steps=4, device="cuda", dtype="bfloat16"),
                tmp_path / "gpu")
    assert [h["loss"] for h in gpu.history] == pytest.approx([h["loss"] for h in cpu.history], rel=0.05)
    assert all(p.dtype == torch.float32 for p in on_gpu.parameters())


def test_train_drafter_on_cuda_end_to_end(target, tmp_path):
    out = tmp_path / "dspark"
    assert main(["train-drafter", "--target", str(target.path), "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--device", "cuda", "--gen-minutes", "0.05", "--gen-batch", "8",
                 "--gen-max-new-tokens", "32", "--stdlib-tokens", "3000", "--max-len", "96",
                 "--target-layers=-1,1", "--layers", "1", "--markov-rank", "16", "--anchors", "32",
                 "--batch", "2", "--steps", "3", "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["training"]["device"] == torch.cuda.get_device_name()
    prompt = list(range(5, 25))

    def serve(method, drafter=None):
        engine = build_engine(EngineConfig(model=str(target.path), method=method, drafter=drafter, device="cuda",
                                           max_context=128))
        return engine.generate(request(prompt, max_new_tokens=24)).output_ids
    assert serve("dspark", str(out)) == serve("ar")
