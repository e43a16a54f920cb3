"""A drafter's draft vocabulary (engine/drafters/vocab.py) from a target cache.

FR-Spec (Zhao et al., 2025) ranks tokens by frequency in a corpus; here the corpus is what the
drafter learns to predict, the target's own next-token choices on the training text: the argmax
of the cached top-k at every position whose next token is supervised. A token outside the subset
is proposed only where it occurs in the request's own context (engine/drafters/vocab.py), so the
share of those choices the subset covers bounds what a drafter loses to it elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from engine.drafters.checkpoint import load_checkpoint, write_draft_vocab
from engine.loading import load_target
from engine.train.cache import expected_manifest, open_cache, read_shards


CHOICE_FIELDS = ("topk_ids", "loss_mask")   # what counting reads from a cache shard (read_shards)


def target_choice_counts(shards: Iterable[dict[str, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """How often the target's argmax is each token [V], over positions followed by a supervised token
    (within a sequence: `offsets` marks where each one starts)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for shard in shards:
        top1, supervised = shard["topk_ids"][:, 0].long(), shard["loss_mask"].bool()
        off = shard["offsets"].tolist()
        for a, b in zip(off, off[1:]):
            counts += torch.bincount(top1[a:b - 1][supervised[a + 1:b]], minlength=vocab_size)
    return counts


def frequent_tokens(counts: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """The `size` most frequent token ids in increasing order, and the share of counts they cover.
    Ties (among them every token the cache never shows) go to the lower id: in a BPE vocabulary that
    is the earlier merge, roughly the more frequent token of the tokenizer's own corpus."""
    if not 1 <= size <= len(counts):
        raise ValueError(f"the draft vocabulary size must be in 1..{len(counts)}, got {size}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("the cache has no supervised positions to count tokens on")
    ids = torch.sort(counts, descending=True, stable=True).indices[:size].sort().values
    return ids, int(counts[ids].sum()) / total


def build_draft_vocab(drafter: Path, cache_dir: Path, size: int, model: str, device: str = "cpu") -> dict:
    """Count the target's choices in the cache, keep the `size` most frequent, store them with the
    drafter (checked to fit the target first). Returns what was stored and its coverage."""
    target = load_target(model, torch.float32, device, allow_download=False)
    load_checkpoint(drafter, target)            # refuse a drafter for another target before writing
    want = expected_manifest(target, [], 0)
    manifest = open_cache(cache_dir, {k: want[k] for k in ("version", "model_id", "model_digest", "vocab_size")})
    counts = target_choice_counts(read_shards(cache_dir, manifest, CHOICE_FIELDS), target.model.args.vocab_size)
    ids, coverage = frequent_tokens(counts, size)
    write_draft_vocab(drafter, ids, {"source_cache": str(cache_dir), "counted_positions": str(int(counts.sum())),
                                     "coverage": f"{coverage:.6f}"})
    return {"size": len(ids), "counted_positions": int(counts.sum()), "coverage": coverage}
