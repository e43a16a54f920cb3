"""Build an Engine from its configuration: load the target, pick the drafter by method."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import EMBEDDED_MODEL, LOOKUP_MIN_MATCH, EngineConfig
from engine.drafters.base import Drafter
from engine.drafters.checkpoint import CheckpointError, load_checkpoint
from engine.drafters.corpus import CorpusIndex
from engine.drafters.dspark import DSparkDrafter
from engine.drafters.eagle3 import Eagle3Drafter
from engine.drafters.lookup import LookupFirst
from engine.drafters.ngram import NgramDrafter
from engine.engine import Engine
from engine.loading import LoadedTarget, ModelLoadError, cache_root, load_target, resolve_model_dir
from engine.memory import check_kv_cache
from engine.prefix_scheduler import PrefixScheduler
from engine.schedulers import build_schedule
from engine.spec_round import Schedule
from engine.sps import hardware_id, load_or_profile
from kernels import KERNELS_VERSION

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# DSpark drafters trained for a target and shipped with the node (docs/training.md): the default
# for --method dspark without --drafter.
SHIPPED_DRAFTERS = {EMBEDDED_MODEL: Path(__file__).parent / "drafters" / "shipped" / "smollm2-135m-dspark"}


def build_drafter(config: EngineConfig, target: LoadedTarget) -> Drafter:
    drafter = build_model_drafter(config, target)
    if not config.lookup_min_match:
        return drafter
    corpus = (CorpusIndex(config.lookup_corpus_tokens, config.lookup_min_match, config.ngram_max)
              if config.lookup_corpus_tokens else None)
    return LookupFirst(drafter, config.ngram_max, config.lookup_min_match, corpus)


def build_model_drafter(config: EngineConfig, target: LoadedTarget) -> Drafter:
    if config.method == "ar":
        return Drafter()
    if config.method == "ngram":
        return NgramDrafter(config.block_size, config.ngram_max)
    drafter = config.drafter
    if drafter is None and config.method == "dspark":
        drafter = SHIPPED_DRAFTERS.get(config.model)
    if drafter is None:
        raise ValueError(f"method {config.method!r} needs a drafter directory (--drafter)")
    checkpoint = load_checkpoint(resolve_model_dir(str(drafter), config.allow_download), target)
    c = checkpoint.config
    where = f"{checkpoint.path} ({c.architectures[0]})"
    if config.method == "eagle3":
        if c.kind != "eagle3":
            raise CheckpointError(f"{where} is not an EAGLE-3 drafter; use --method dspark or dflash")
        return Eagle3Drafter(checkpoint, target.model, config.block_size, config.max_batch, config.max_context,
                             target.eos_token_ids)
    if c.kind != "dspark":
        raise CheckpointError(f"{where} is an EAGLE-3 drafter; use --method eagle3")
    if config.method == "dflash" and (c.markov_rank or c.enable_confidence_head):
        raise CheckpointError(f"{where} has a Markov or confidence head (a DSpark drafter); use --method dspark")
    if config.confidence_threshold > 0 and not c.enable_confidence_head:
        raise CheckpointError(f"{where} has no confidence head, so confidence_threshold cannot apply")
    return DSparkDrafter(checkpoint, target.model, config.method, config.block_size, config.max_batch,
                         config.max_context)


def resolve_method(config: EngineConfig) -> EngineConfig:
    """Settle method "auto": DSpark wherever a drafter is at hand, through the confidence scheduler
    (a full block loses to plain decoding wherever drafts are rarely accepted) with prompt lookup
    ahead of it (what lifts it above plain decoding at 1-8 users here; docs/benchmarks.md), else
    plain decoding. Lookup is left out under a static schedule: a full block of lookup drafts
    verified for every request loses at large batches."""
    if config.method != "auto":
        return config
    if config.drafter is None and config.model not in SHIPPED_DRAFTERS:
        return config.model_copy(update={"method": "ar", "lookup_min_match": 0})
    scheduled = "scheduler" in config.model_fields_set or config.confidence_threshold > 0
    update = {"method": "dspark", "scheduler": config.scheduler if scheduled else "sync"}
    if update["scheduler"] != "static" and "lookup_min_match" not in config.model_fields_set:
        update["lookup_min_match"] = min(LOOKUP_MIN_MATCH, config.ngram_max)
    return config.model_copy(update=update)


def build_engine(config: EngineConfig, target: LoadedTarget | None = None) -> Engine:
    config = resolve_method(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    if target is None:
        target = load_target(config.model, DTYPES[config.dtype], config.device, config.allow_download)
    check_context(config, target)
    check_kv_cache(config, target.model)
    return Engine(config, target, build_drafter(config, target), make_schedule(config, target))


def check_context(config: EngineConfig, target: LoadedTarget) -> None:
    """Refuse a max_context past the positions the model has rotary tables for: the engine would
    start, then fail the first round whose request reaches that far."""
    positions = target.model.args.max_position_embeddings
    if config.max_context > positions:
        raise ModelLoadError(f"max_context {config.max_context} is more than the {positions} positions "
                             f"{target.model_id} takes (its max_position_embeddings); set max_context to at most "
                             f"{positions}")


def make_schedule(config: EngineConfig, target: LoadedTarget) -> Schedule:
    if config.scheduler == "static":
        return build_schedule(config)
    # SPS(R, W) depends on the model, dtype, device, processor, thread count and operators: profile
    # once per combination.
    key = (f"{target.digest.hex()[:16]}-{config.dtype}-{config.device.replace(':', '')}"
           f"-{hardware_id(config.device)}-t{torch.get_num_threads()}-k{KERNELS_VERSION}")
    sps = load_or_profile(target.model, key, config.max_batch, config.block_size + 1, cache_root() / "sps")
    return PrefixScheduler(sps, mode=config.scheduler, budget=config.verify_budget)
