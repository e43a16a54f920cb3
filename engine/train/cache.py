"""The target cache (reference §3.1): what the target computes on the training text, on disk.

Per token: input id, loss mask (1 on assistant content), the raw outputs of the tapped layers
concatenated [m*H] and the post-final-norm hidden state [H] (bf16), plus the target's top-k
next-token probabilities derived from it (what the losses use: recomputing the full-vocabulary
softmax every epoch would cost more than the drafter itself on a CPU).

Layout: `shard-NNNNN.safetensors` files (tensors concatenated over their sequences, `offsets` marks
the boundaries) and `manifest.json`, written last: model id and weight digest, tapped layer ids,
hidden size, vocabulary size, k, and a sha256 per shard. Opening a cache checks the manifest
against the target and layer set asked for; loading a shard checks its digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from engine.loading import LoadedTarget

VERSION = 1
FIELDS = ("input_ids", "loss_mask", "taps", "last_hidden", "topk_ids", "topk_probs", "offsets")


class CacheError(ValueError):
    """A target cache that cannot be used for this run; the message names the problem."""


class ShardEntry(BaseModel):
    """One shard as the manifest lists it: a file of this directory (no other path) and its digest."""
    file: str = Field(pattern=r"^shard-\d{5}\.safetensors$")
    sequences: int = Field(ge=1)
    tokens: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ManifestCounts(BaseModel):
    """The parts of manifest.json training reads besides those `expected_manifest` compares."""
    model_config = ConfigDict(extra="allow")

    shards: list[ShardEntry] = Field(min_length=1)
    sequences: int = Field(ge=1)
    tokens: int = Field(ge=1)


@dataclass
class Sample:
    input_ids: list[int]
    loss_mask: list[int]          # 1 where the token is supervised (assistant content)
    source: str


@dataclass
class CachedSequence:
    input_ids: torch.Tensor       # [S] long
    loss_mask: torch.Tensor       # [S] bool
    taps: torch.Tensor            # [S, m*H] bf16
    last_hidden: torch.Tensor     # [S, H] bf16
    topk_ids: torch.Tensor        # [S, k] long: the target's most likely next tokens at each position
    topk_probs: torch.Tensor      # [S, k] fp32

    def to(self, device: torch.device | str) -> "CachedSequence":
        return CachedSequence(*(getattr(self, f.name).to(device) for f in fields(self)))


def expected_manifest(target: LoadedTarget, layer_ids: list[int], topk: int) -> dict:
    return {"version": VERSION, "model_id": target.model_id, "model_digest": target.digest.hex(),
            "target_layer_ids": list(layer_ids), "hidden_size": target.model.args.hidden_size,
            "vocab_size": target.model.args.vocab_size, "topk": topk}


@torch.inference_mode()
def score(target: LoadedTarget, samples: list[Sample], layer_ids: list[int], topk: int
          ) -> dict[str, torch.Tensor]:
    """One batch through the target (ragged, right-padded): the shard tensors of these samples."""
    model = target.model
    lengths = [len(s.input_ids) for s in samples]
    width = max(lengths)
    tokens = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        tokens[r, :len(s.input_ids)] = torch.tensor(s.input_ids)
    cache = model.new_cache(len(samples), width)
    out = model.forward(tokens.to(model.device), torch.arange(width)[None].expand(len(samples), -1).to(model.device),
                        torch.arange(len(samples), device=model.device), cache, taps=tuple(layer_ids),
                        lengths=lengths)
    valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    on_device = valid.to(model.device)
    hidden = out.hidden[on_device]
    # top-k where the logits are: the full distributions are 196 KB a token for SmolLM2, 77 GB through
    # the host for the GPU run's 393k tokens, whose scoring took ~2.5 minutes that way
    top = torch.softmax(model.logits(hidden), dim=-1).topk(topk, dim=-1)
    return {"input_ids": tokens[valid].to(torch.int32),
            "loss_mask": torch.tensor([m for s in samples for m in s.loss_mask], dtype=torch.uint8),
            "taps": out.taps[on_device].to(torch.bfloat16).cpu(), "last_hidden": hidden.to(torch.bfloat16).cpu(),
            "topk_ids": top.indices.to(torch.int32).cpu(), "topk_probs": top.values.to(torch.float16).cpu()}


def build_cache(target: LoadedTarget, samples: list[Sample], directory: Path, layer_ids: list[int],
                topk: int = 8, batch_tokens: int = 2048, shard_tokens: int = 200_000,
                sources: dict | None = None) -> Path:
    """Score `samples` with the target and write the cache; an existing complete cache for the same
    target, layers and k is kept as it is."""
    directory = Path(directory)
    want = expected_manifest(target, layer_ids, topk)
    if (directory / "manifest.json").exists():
        open_cache(directory, want)
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))   # less padding
    shards, pending, pending_tokens = [], [], 0
    batch: list[Sample] = []
    bar = tqdm(total=sum(len(s.input_ids) for s in samples), unit="tok", desc="target cache", mininterval=10)

    def flush_batch():
        nonlocal pending_tokens
        if batch:
            part = score(target, batch, layer_ids, topk)
            part["lengths"] = torch.tensor([len(s.input_ids) for s in batch])
            pending.append(part)
            pending_tokens += len(part["input_ids"])
            bar.update(len(part["input_ids"]))
            batch.clear()

    for i in order:
        if batch and (len(batch) + 1) * len(samples[i].input_ids) > batch_tokens:
            flush_batch()
        batch.append(samples[i])
        if pending_tokens >= shard_tokens:
            shards.append(_write_shard(directory, len(shards), pending))
            pending, pending_tokens = [], 0
    flush_batch()
    if pending:
        shards.append(_write_shard(directory, len(shards), pending))
    bar.close()
    manifest = dict(want, shards=shards, sequences=len(samples),
                    tokens=sum(len(s.input_ids) for s in samples), sources=sources or {})
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def _write_shard(directory: Path, index: int, parts: list[dict[str, torch.Tensor]]) -> dict:
    tensors = {name: torch.cat([p[name] for p in parts]) for name in FIELDS if name != "offsets"}
    lengths = torch.cat([p["lengths"] for p in parts])
    tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    name = f"shard-{index:05d}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / name)
    return {"file": name, "sequences": len(lengths), "tokens": int(lengths.sum()),
            "sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest()}


def open_cache(directory: Path, want: dict) -> dict:
    """Read and check the manifest against the target / layer set / k of this run."""
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{directory}: no manifest.json (not a target cache, or its build was interrupted: "
                         "delete the directory to rebuild it)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{path} cannot be read: {exc}") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path}: expected a JSON object")
    for key, value in want.items():
        if manifest.get(key) != value:
            raise CacheError(f"{directory}: the cache was built with {key}={manifest.get(key)!r}, this run needs "
                             f"{value!r} (another model or layer set: use another --cache-dir or delete it)")
    try:
        ManifestCounts.model_validate(manifest)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CacheError(f"{path} is damaged ({problems}): delete the directory to rebuild the cache") from None
    return manifest


def read_shards(directory: Path, manifest: dict, names: tuple[str, ...] = FIELDS) -> Iterator[dict[str, torch.Tensor]]:
    """Each shard's tensors `names` (with `offsets`, the sequence boundaries), one shard at a time;
    a shard whose bytes changed is refused. Only the tensors asked for are read into memory: the taps
    and final hidden states are 99% of a shard (SmolLM2, 4 taps, k=8), and counting tokens needs
    neither."""
    names = tuple(dict.fromkeys((*names, "offsets")))
    for shard in manifest["shards"]:
        path = Path(directory) / shard["file"]
        digest = hashlib.sha256()
        try:
            with path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
        except OSError as exc:
            raise CacheError(f"{path}: cannot be read ({exc.strerror})") from None
        if digest.hexdigest() != shard["sha256"]:
            raise CacheError(f"{path} is corrupt: its sha256 does not match the manifest (rebuild the cache)")
        try:
            with safe_open(path, "pt") as f:
                missing = [n for n in names if n not in f.keys()]
                if missing:
                    raise CacheError(f"{path} lacks {', '.join(missing)}")
                yield {n: f.get_tensor(n) for n in names}
        except SafetensorError as exc:
            raise CacheError(f"{path} is corrupt: {exc}") from None


def load_sequences(directory: Path, manifest: dict) -> list[CachedSequence]:
    """Every sequence of the cache, in memory (see `read_shards` for the checks)."""
    sequences = []
    for t in read_shards(directory, manifest):
        off = t["offsets"].tolist()
        for a, b in zip(off, off[1:]):
            sequences.append(CachedSequence(
                input_ids=t["input_ids"][a:b].long(), loss_mask=t["loss_mask"][a:b].bool(),
                taps=t["taps"][a:b], last_hidden=t["last_hidden"][a:b], topk_ids=t["topk_ids"][a:b].long(),
                topk_probs=t["topk_probs"][a:b].float()))
    return sequences


def feature_rms(sequences: list[CachedSequence], max_tokens: int = 50_000) -> torch.Tensor:
    """Root mean square of each tapped feature [m*H] over (up to max_tokens of) the cache."""
    total, count = None, 0
    for seq in sequences:
        x = seq.taps.float()
        total = x.pow(2).sum(0) if total is None else total + x.pow(2).sum(0)
        count += len(x)
        if count >= max_tokens:
            break
    return (total / max(count, 1)).sqrt().clamp_min(1e-3)
