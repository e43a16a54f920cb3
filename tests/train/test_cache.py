"""The target cache: what is stored is what the target computes, and bad caches are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine.train.cache import CacheError, expected_manifest, feature_rms, load_sequences, open_cache, read_shards
from tests.train.conftest import TAPS


def test_round_trip_matches_the_target(target, samples, sequences, cache_dir):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1                      # shard boundaries are crossed
    assert sorted(s.input_ids.tolist() for s in sequences) == sorted(s.input_ids for s in samples)
    seq = max(sequences, key=lambda s: len(s.input_ids))
    ids = seq.input_ids
    cache = target.model.new_cache(1, len(ids))
    out = target.model.forward(ids[None], torch.arange(len(ids))[None], torch.tensor([0]), cache, taps=tuple(TAPS))
    torch.testing.assert_close(seq.taps.float(), out.taps[0], atol=0.05, rtol=0.02)          # stored in bf16
    torch.testing.assert_close(seq.last_hidden.float(), out.hidden[0], atol=0.05, rtol=0.02)
    probs = torch.softmax(target.model.logits(out.hidden[0]), -1)
    top = probs.topk(8, -1)
    assert torch.equal(seq.topk_ids[:, 0], top.indices[:, 0])
    torch.testing.assert_close(seq.topk_probs, top.values, atol=2e-3, rtol=2e-3)             # stored in fp16
    source = next(s for s in samples if s.input_ids == ids.tolist())
    assert seq.loss_mask.tolist() == [bool(m) for m in source.loss_mask]


@pytest.mark.parametrize("key,value", [("target_layer_ids", [-1, 2]), ("model_digest", "00" * 32),
                                       ("hidden_size", 128), ("topk", 16)])
def test_a_cache_of_another_model_or_layer_set_is_refused(target, cache_dir, key, value):
    want = dict(expected_manifest(target, TAPS, 8), **{key: value})
    with pytest.raises(CacheError, match=key):
        open_cache(cache_dir, want)


def test_a_corrupt_shard_is_refused(target, cache_dir, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    shard = sorted(copy.glob("shard-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    manifest = open_cache(copy, expected_manifest(target, TAPS, 8))
    with pytest.raises(CacheError, match=f"{shard.name} is corrupt"):
        load_sequences(copy, manifest)
    shard.unlink()
    with pytest.raises(CacheError, match="cannot be read"):
        load_sequences(copy, manifest)


def test_shards_can_be_read_without_their_taps(target, cache_dir, sequences):
    manifest = open_cache(cache_dir, expected_manifest(target, TAPS, 8))
    shards = list(read_shards(cache_dir, manifest, ("topk_ids",)))
    assert all(shard.keys() == {"topk_ids", "offsets"} for shard in shards)
    assert torch.equal(torch.cat([s["topk_ids"] for s in shards]).long(), torch.cat([s.topk_ids for s in sequences]))
    with pytest.raises(CacheError, match="lacks logits"):
        next(read_shards(cache_dir, manifest, ("logits",)))


def test_an_unfinished_cache_is_refused(target, tmp_path):
    (tmp_path / "shard-00000.safetensors").write_bytes(b"partial")
    with pytest.raises(CacheError, match="no manifest.json"):
        open_cache(tmp_path, expected_manifest(target, TAPS, 8))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="cannot be read"):
        open_cache(tmp_path, expected_manifest(target, TAPS, 8))


@pytest.mark.parametrize("damage,message", [
    (lambda m: m["shards"][0].pop("sha256"), "shards.0.sha256: Field required"),
    (lambda m: m.update(shards=[s["file"] for s in m["shards"]]), "shards.0: Input should be a valid dictionary"),
    (lambda m: m["shards"][0].update(file="../elsewhere/shard-00000.safetensors"), "shards.0.file"),
    (lambda m: m["shards"][0].update(file=None), "shards.0.file"),
    (lambda m: m.pop("sequences"), "sequences: Field required"),
    (lambda m: m.update(shards=[]), "shards: List should have at least 1 item"),
])
def test_a_damaged_manifest_is_refused_naming_the_entry(target, cache_dir, tmp_path, damage, message):
    """A hand-edited or half-restored manifest.json: refused at open, not a KeyError or TypeError
    while the shards are read."""
    copy = tmp_path / "c"
    shutil.copytree(cache_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    damage(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="is damaged") as refused:
        open_cache(copy, expected_manifest(target, TAPS, 8))
    assert message in str(refused.value) and "delete the directory to rebuild" in str(refused.value)


def test_feature_rms_is_per_feature(sequences):
    x = torch.cat([s.taps.float() for s in sequences])
    torch.testing.assert_close(feature_rms(sequences, max_tokens=10**9), x.pow(2).mean(0).sqrt())
