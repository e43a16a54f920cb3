"""Build an Engine from its configuration: load the target, pick the drafter by method."""

from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.drafters.base import Drafter
from engine.drafters.ngram import NgramDrafter
from engine.engine import Engine
from engine.loading import LoadedTarget, load_target

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_drafter(config: EngineConfig, target: LoadedTarget) -> Drafter:
    if config.method == "ar":
        return Drafter()
    if config.method == "ngram":
        return NgramDrafter(config.block_size, config.ngram_max)
    raise ValueError(f"method {config.method!r} is not available in this build")


def build_engine(config: EngineConfig, target: LoadedTarget | None = None) -> Engine:
    if config.threads:
        torch.set_num_threads(config.threads)
    if target is None:
        target = load_target(config.model, DTYPES[config.dtype], config.device, config.allow_download)
    return Engine(config, target, build_drafter(config, target))
