"""Fixtures: a tiny Llama and a tiny Qwen3 target (see helpers.make_target)."""

from __future__ import annotations

import pytest
import torch

from engine.loading import LoadedTarget, load_target
from tests.drafters.helpers import make_target


@pytest.fixture(scope="session", params=["llama", "qwen3"])
def target(request, tmp_path_factory) -> LoadedTarget:
    path = make_target(tmp_path_factory.mktemp(request.param) / "target", request.param)
    return load_target(str(path), torch.float32)
