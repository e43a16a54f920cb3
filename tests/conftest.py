"""Shared fixtures: the embedded model (loaded once per session) and small random checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

EVAL_DIR = Path(os.environ.get("DSPARK_EVAL_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "eval"))

# Tests share two cores with the daemons they start: one torch thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("DSPARK_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def smollm_fp32():
    from engine.loading import load_target
    return load_target("smollm2-135m-instruct", torch.float32)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from engine.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), family="llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    from engine.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), family="qwen3")


def eval_prompts(name: str, n: int) -> list[str]:
    from engine.prompts import load_first_turns
    return load_first_turns(EVAL_DIR / name, n)
