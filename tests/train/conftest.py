"""A tiny real target (random weights, SmolLM2 tokenizer) and a small target cache built from it."""

from __future__ import annotations

import pytest
import torch

from engine.loading import LoadedTarget, load_target
from engine.train.cache import build_cache, expected_manifest, load_sequences, open_cache
from engine.train.data import stdlib_samples
from tests.drafters.helpers import make_target

TAPS = [-1, 1]


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(1)   # the CI box has 2 cores shared by parallel jobs


@pytest.fixture(scope="session")
def target(tmp_path_factory) -> LoadedTarget:
    return load_target(str(make_target(tmp_path_factory.mktemp("train-target") / "t", "llama")), torch.float32)


@pytest.fixture(scope="session")
def samples(target):
    return stdlib_samples(target.tokenizer, target.eos_token_ids[0], token_budget=2500, max_len=96, seed=1)


@pytest.fixture(scope="session")
def cache_dir(target, samples, tmp_path_factory):
    return build_cache(target, samples, tmp_path_factory.mktemp("cache") / "c", TAPS, topk=8, shard_tokens=1000,
                       sources={"stdlib": len(samples)})


@pytest.fixture(scope="session")
def sequences(target, cache_dir):
    return load_sequences(cache_dir, open_cache(cache_dir, expected_manifest(target, TAPS, 8)))
