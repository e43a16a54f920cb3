"""train-drafter end to end: data -> target cache -> training -> DeepSpec checkpoint with metadata."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.build import build_engine
from engine.config import EMBEDDED_MODEL, EngineConfig
from engine.drafters.checkpoint import (CALIBRATION_FIELDS, HISTORY_PRIOR_FIELDS, DrafterCheckpoint,
                                        check_target_layers, load_checkpoint, parse_config, write_draft_vocab)
from engine.drafters.init import default_layer_ids, init_drafter
from engine.loading import LoadedTarget, cache_root, device_name, load_target
from engine.train import data
from engine.train.cache import build_cache, expected_manifest, feature_rms, load_sequences, open_cache
from engine.train.trainer import STATE_FILE, TrainingError, TrainSettings, build_module, export, train

FRESH_ARCHITECTURE = {"layers": 1, "markov_rank": 64, "markov_type": "vanilla", "block_size": 7}
# A fine-tuned drafter's calibration no longer fits it, nor does its training summary (kept under
# training.init_from instead).
NOT_INHERITED = (*CALIBRATION_FIELDS, *HISTORY_PRIOR_FIELDS, "calibration", "calibration_greedy", "training")
DRAFT_CONFIG = "draft_config.json"   # the untrained drafter's config, kept so a resumed run rebuilds it


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["dspark", "dflash", "eagle3"] = "dspark"
    model: str = EMBEDDED_MODEL
    out: Path
    cache_dir: Path | None = None
    # The architecture: FRESH_ARCHITECTURE where not given; from the drafter itself with init_from.
    layers: int | None = Field(None, ge=1, le=16)
    markov_rank: int | None = Field(None, ge=0, le=4096)
    markov_type: Literal["vanilla", "gated", "rnn"] | None = None
    block_size: int | None = Field(None, ge=2, le=16)
    init_from: Path | None = None    # continue training an exported drafter (fine-tuning on new data)
    target_layers: list[int] | None = None
    steps: int = Field(1000, ge=1)
    minutes: float | None = Field(None, gt=0)
    batch: int = Field(4, ge=1, le=256)
    anchors: int = Field(512, ge=1, le=4096)
    lr: float = Field(6e-4, gt=0, lt=1)
    seed: int = Field(42, ge=0, lt=2**32)   # step n draws with seed * 1_000_003 + n, which must fit in 64 bits
    resume: bool = False
    save_every: int = Field(100, ge=1)
    gen_minutes: float = Field(5.0, ge=0)
    gen_max_new_tokens: int = Field(256, ge=16, le=2048)
    gen_batch: int = Field(32, ge=1, le=256)
    # Requests to pass over at the head of the generation list: a second cache answers new requests
    # (the code requests come in a fixed order, so another seed alone would repeat them).
    gen_skip: int = Field(0, ge=0)
    # Greedy responses are what a T=0 request meets: SmolLM2's repeat themselves twice as often as
    # its T=0.7 samples (3-gram copy rate 0.33-0.42 vs 0.16, measured). DeepSpec samples at 0.7
    # alone, the default; half greedy (0,0.7) did not move τ of the 1-layer CPU-trained drafters
    # (docs/benchmarks.md, "Two recipe changes tried").
    gen_temperatures: list[float] = Field(default_factory=lambda: [0.7], min_length=1)
    stdlib_tokens: int = Field(100_000, ge=0)
    max_len: int = Field(512, ge=32, le=4096)
    topk: int = Field(8, ge=1, le=1024)
    norm_init: float = Field(0.1, gt=0, le=1)
    threads: int | None = Field(None, ge=1, le=1024)   # as engine.threads: more crash torch (a segfault)
    device: str = "cpu"          # checked by load_target (engine.loading.check_device)
    # The arithmetic of response generation and of training (trainer.py). The cache's features and
    # soft labels are scored in fp32 either way.
    dtype: Literal["float32", "bfloat16"] = "float32"
    cache_only: bool = False

    @field_validator("target_layers")
    @classmethod
    def _layers(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and (not ids or any(b <= a for a, b in zip(ids, ids[1:]))):
            raise ValueError(f"target layers must be a strictly increasing list, got {ids}")
        return ids

    @model_validator(mode="after")
    def _architecture(self) -> TrainOptions:
        given = [name for name in FRESH_ARCHITECTURE if getattr(self, name) is not None]
        if self.init_from is not None and given:
            raise ValueError(f"--init-from takes the architecture from the drafter; drop "
                             f"{', '.join('--' + n.replace('_', '-') for n in given)}")
        if self.init_from is not None and self.resume:
            raise ValueError("--resume continues the run in --out; --init-from starts a new one")
        return self

    @field_validator("gen_temperatures")
    @classmethod
    def _temperatures(cls, temps: list[float]) -> list[float]:
        if any(not 0 <= t <= 2 for t in temps):
            raise ValueError(f"generation temperatures must lie in [0, 2], got {temps}")
        return temps


def warm_start(opts: TrainOptions, target: LoadedTarget) -> tuple[dict, DrafterCheckpoint, dict]:
    """(config, checkpoint, provenance) of the exported drafter training continues from."""
    checkpoint = load_checkpoint(opts.init_from, target)
    # DFlash is the DSpark architecture without its Markov and confidence heads (init_drafter)
    c = checkpoint.config
    kind = "eagle3" if c.kind == "eagle3" else "dspark" if c.enable_confidence_head else "dflash"
    if kind != opts.kind:
        raise TrainingError(f"--init-from {opts.init_from} is a {kind} drafter, not {opts.kind}")
    if opts.target_layers is not None and opts.target_layers != c.target_layer_ids:
        raise TrainingError(f"--init-from {opts.init_from} taps target layers {c.target_layer_ids}, "
                            f"not {opts.target_layers}")
    raw = json.loads((checkpoint.path / "config.json").read_text())
    config = {k: v for k, v in raw.items() if k not in NOT_INHERITED}
    provenance = {"path": str(checkpoint.path), "sha256": checkpoint.digest.hex(),
                  "training": raw.get("training")}
    return config, checkpoint, provenance


def resumed_run(opts: TrainOptions) -> tuple[dict, dict | None]:
    """(config, provenance) of the untrained drafter of the run saved in --out; flags that would
    build another one are refused, before any cache is built."""
    path = opts.out / DRAFT_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainingError(f"--resume: {path} is missing, so the saved run cannot be rebuilt "
                            f"(delete {opts.out} to start over)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingError(f"--resume: {path} cannot be read: {exc}") from None
    if not isinstance(config, dict):
        raise TrainingError(f"--resume: {path}: expected a JSON object")
    provenance, architecture = config.pop("init_from", None), config.pop("architecture", None)
    asked = {name: getattr(opts, name) for name in FRESH_ARCHITECTURE if getattr(opts, name) is not None}
    if provenance is not None and asked:
        raise TrainingError(f"--resume: the run in {opts.out} started from --init-from {provenance.get('path')} and "
                            f"has its architecture; drop {', '.join(_flag(n) for n in asked)}")
    changed = [f"{_flag(name)} {architecture[name]} (asked: {value})" for name, value in asked.items()
               if architecture is not None and architecture.get(name) != value]
    if opts.target_layers is not None and opts.target_layers != config.get("target_layer_ids"):
        changed.append(f"--target-layers {config.get('target_layer_ids')} (asked: {opts.target_layers})")
    if changed:
        raise TrainingError(f"--resume: the run in {opts.out} was started with {', '.join(changed)}: resume it as "
                            "it started, or use another --out")
    parse_config(config, str(path))
    return config, provenance


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_out(opts: TrainOptions) -> None:
    """Refuse an --out or --cache-dir training cannot write, or an --out whose drafter it would
    replace, before the target is loaded or any cache built."""
    state_file = opts.out / STATE_FILE
    # --cache-only writes nothing to --out (the recipes give it a throwaway one)
    for flag, path in (("--out", None if opts.cache_only else opts.out), ("--cache-dir", opts.cache_dir)):
        existing = next((p for p in (path, *path.parents) if p.exists()), None) if path is not None else None
        if existing is not None and not existing.is_dir():
            raise TrainingError(f"{flag} {path}: {existing} is a file, not a directory")
    if not opts.cache_only and opts.cache_dir is not None and opts.cache_dir.resolve() == opts.out.resolve():
        # the shards are *.safetensors too: the drafter directory would not load (a tensor input_ids)
        raise TrainingError(f"--out and --cache-dir are the same directory ({opts.out}): give the drafter its own")
    if state_file.exists() and not opts.resume:
        raise TrainingError(f"{opts.out} holds an unfinished or finished run ({STATE_FILE}); "
                            "pass --resume to continue it or choose another --out")
    if opts.resume and not state_file.exists():
        raise TrainingError(f"--resume: {state_file} does not exist")
    # a drafter no run of ours continues: the shipped one, a calibrated one, the --init-from drafter itself
    drafter = [name for name in ("config.json", "model.safetensors") if (opts.out / name).exists()]
    if drafter and not opts.resume and not opts.cache_only:
        raise TrainingError(f"{opts.out} holds a drafter ({', '.join(drafter)}) and no run to resume: training "
                            "would replace it; choose another --out")


def layer_ids(opts: TrainOptions, target: LoadedTarget) -> list[int]:
    ids = opts.target_layers or default_layer_ids(target.model.args.num_layers, 4)
    if opts.kind == "eagle3" and -1 in ids:
        raise TrainingError("an EAGLE-3 drafter cannot tap the embedding output (-1)")
    check_target_layers(ids, target.model.args.num_layers, "--target-layers")
    return ids


def prepare_cache(opts: TrainOptions, target: LoadedTarget, ids: list[int], log) -> tuple[Path, dict]:
    """Build the cache unless a matching one exists (one cache serves all three kinds)."""
    directory = opts.cache_dir or cache_root() / "train-cache" / f"{target.digest.hex()[:16]}-{'_'.join(map(str, ids))}"
    want = expected_manifest(target, ids, opts.topk)
    if not (directory / "manifest.json").exists():
        tok = target.tokenizer
        eot = target.eos_token_ids[0]
        samples: list = []
        if opts.gen_minutes > 0:
            requests = data.generation_prompts(opts.seed)
            gen_prompts = requests[opts.gen_skip:]
            if not gen_prompts:
                raise TrainingError(f"--gen-skip {opts.gen_skip} passes over all {len(requests)} generation requests")
            # Decoding is weight-bound at small batches: 64 requests at a time give ~2.5x the tokens/s
            # of 8 on 2 CPU cores (measured), at the price of a longer first prefill. In bf16 the
            # responses are those of the target as a GPU node serves it.
            decoder = target if opts.dtype == "float32" else load_target(opts.model, torch.bfloat16, opts.device)
            engine = build_engine(EngineConfig(model=opts.model, method="ar", max_batch=opts.gen_batch,
                                               max_context=opts.max_len + opts.gen_max_new_tokens + 8,
                                               device=opts.device, dtype=opts.dtype), decoder)
            samples += data.generated_samples(engine, tok, gen_prompts, opts.gen_max_new_tokens, opts.max_len,
                                              opts.gen_minutes, opts.seed, tuple(opts.gen_temperatures), log)
            del engine, decoder
        n_generated = len(samples)
        if opts.stdlib_tokens:
            samples += data.stdlib_samples(tok, eot, opts.stdlib_tokens, opts.max_len, opts.seed)
        if not samples:
            generated = (f"--gen-minutes {opts.gen_minutes} gave no response of {data.MIN_LOSS_TOKENS}+ tokens"
                         if opts.gen_minutes > 0 else "--gen-minutes is 0")
            stdlib = (f"--stdlib-tokens {opts.stdlib_tokens} gave no chunk" if opts.stdlib_tokens
                      else "--stdlib-tokens is 0")
            raise TrainingError(f"no training data: {generated} and {stdlib}; give more of either")
        sources = {
            "generated": {"prompts": "engine/train/data.py: code requests from Python stdlib "
                                     "signatures + docstrings, in prose or as a stub to complete (STUB_TASKS; "
                                     "every 20th held out), MATH_TEMPLATES word problems (MATH_ENDINGS), and "
                                     "general requests (GENERAL_PROMPTS, GENERAL_TASKS x GENERAL_TOPICS), each once; "
                                     "none from shared/eval",
                          "sampling": data.describe_sampling(tuple(opts.gen_temperatures)),
                          "dtype": opts.dtype,
                          "skipped": opts.gen_skip,
                          "responses": n_generated,
                          "tokens": sum(sum(s.loss_mask) for s in samples[:n_generated])},
            "stdlib": {"root": str(data.stdlib_files()[0].parent) if data.stdlib_files() else "",
                       "chunks": len(samples) - n_generated,
                       "tokens": sum(sum(s.loss_mask) for s in samples[n_generated:])},
        }
        log(f"scoring {len(samples)} sequences ({sum(len(s.input_ids) for s in samples)} tokens) with the target")
        build_cache(target, samples, directory, ids, opts.topk, sources=sources)
    elif not opts.resume:   # the data flags asked for data that is not made: say so (a resume expects it)
        log(f"using the target cache in {directory} as built (--gen-*, --stdlib-tokens and --max-len do not "
            "apply to it; another --cache-dir builds a new one)")
    return directory, open_cache(directory, want)


def run(opts: TrainOptions, log=print) -> dict:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    check_out(opts)
    target = load_target(opts.model, torch.float32, opts.device)
    start = None
    if opts.resume:   # the weights come from the saved state; the stored config gives the shapes
        config, provenance = resumed_run(opts)
    elif opts.init_from:
        config, start, provenance = warm_start(opts, target)
    else:
        config, provenance = None, None
    ids = config["target_layer_ids"] if config is not None else layer_ids(opts, target)
    t0 = time.monotonic()
    cache_dir, manifest = prepare_cache(opts, target, ids, log)
    cache_seconds = time.monotonic() - t0
    if opts.cache_only:
        return {"cache": str(cache_dir), "cache_seconds": round(cache_seconds, 1), "sequences": manifest["sequences"],
                "tokens": manifest["tokens"], "sources": manifest.get("sources", {})}
    sequences = load_sequences(cache_dir, manifest)
    if opts.resume:
        module = build_module(parse_config(config, str(opts.out / DRAFT_CONFIG)), None)
    elif config is not None:   # --init-from: its weights as they are, no fresh-start scaling
        opts.out.mkdir(parents=True, exist_ok=True)
        (opts.out / DRAFT_CONFIG).write_text(json.dumps(dict(config, init_from=provenance)))
        # The draft vocabulary ranks the target's choices, not the drafter's: it fits the tuned
        # drafter as well (unlike the calibration, which is dropped).
        if start.draft_vocab is not None:
            write_draft_vocab(opts.out, start.draft_vocab, {"source": f"--init-from {start.path}"})
        module = build_module(parse_config(config, DRAFT_CONFIG), start.weights)
    else:
        architecture = {name: default if getattr(opts, name) is None else getattr(opts, name)
                        for name, default in FRESH_ARCHITECTURE.items()}
        config, state = init_drafter(target, opts.kind, **architecture, target_layer_ids=ids, seed=opts.seed)
        # With the target's LM head, a fresh drafter copies the anchor (its slot-0 input is the anchor's
        # embedding, whose logit dominates): a small final norm starts it near uniform instead.
        state["norm.weight"] = state["norm.weight"] * opts.norm_init
        # Raw residual streams carry a few massive dimensions (SmolLM2 layers 18 and 27: one dim of
        # rms ~1300 against a median of ~5); fc over them would see little else. Scaling fc's input
        # columns by 1 / rms gives every feature an equal start; the architecture is unchanged.
        state["fc.weight"] = state["fc.weight"] / feature_rms(sequences)[None, :]
        opts.out.mkdir(parents=True, exist_ok=True)
        # the flags it was built from, so that --resume refuses others (resumed_run)
        (opts.out / DRAFT_CONFIG).write_text(json.dumps(dict(config, architecture=architecture)))
        module = build_module(parse_config(config, DRAFT_CONFIG), state)
    settings = TrainSettings(kind=opts.kind, steps=opts.steps, batch=opts.batch, lr=opts.lr, seed=opts.seed,
                             max_len=opts.max_len, max_anchors=opts.anchors, minutes=opts.minutes,
                             save_every=opts.save_every, device=opts.device, dtype=opts.dtype,
                             # a cache rebuilt with other data under the same directory is not the run resumed
                             data=hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest())
    result = train(module, target.model, sequences, settings, opts.out)
    last = result.history[-20:]
    summary = {
        "kind": opts.kind, "device": device_name(opts.device), "dtype": opts.dtype, "steps_done": result.steps_done,
        "steps": opts.steps, "finished": result.finished,
        "train_seconds": round(result.seconds, 1), "cache_seconds": round(cache_seconds, 1),
        "anchors_per_s": round(result.anchors_per_s, 1), "init_from": provenance,
        "seed": opts.seed, "lr": opts.lr, "batch": opts.batch, "anchors": opts.anchors,
        "final_loss": sum(h["loss"] for h in last) / max(len(last), 1),
        "final_accept": [round(sum(h["accept"][t] for h in last) / max(len(last), 1), 4)
                         for t in range(len(last[0]["accept"]))] if last else [],
        "data": {"cache": str(cache_dir), "sequences": manifest["sequences"], "tokens": manifest["tokens"],
                 "topk": manifest["topk"], "sources": manifest.get("sources", {})},
    }
    export(module, dict(config, training=summary), opts.out)
    (opts.out / "train_log.json").write_text(json.dumps(result.history))
    return summary

