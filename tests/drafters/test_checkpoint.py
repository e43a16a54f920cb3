"""DeepSpec checkpoints: the documented fields, a save/load round trip, and every refusal."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from engine.build import build_engine
from engine.config import EngineConfig
import torch

from engine.drafters.checkpoint import (DRAFT_VOCAB_FILE, CheckpointError, load_checkpoint, save_checkpoint,
                                        write_draft_vocab)
from engine.drafters.init import init_drafter
from engine.sequence import Sequence
from tests.drafters.helpers import request, write_drafter


def test_config_has_the_deepspec_fields(target, tmp_path):
    path = write_drafter(target, tmp_path / "d", "dspark", markov_type="gated")
    config = json.loads((path / "config.json").read_text())
    family = "Qwen3" if target.model.args.family == "qwen3" else "Llama"
    assert config["architectures"] == [f"{family}DSparkModel"]
    assert config["model_type"] == target.hf_config.model_type          # deep copy of the target config
    assert config["hidden_size"] == target.model.args.hidden_size
    assert config["num_target_layers"] == target.model.args.num_layers
    assert (config["block_size"], config["target_layer_ids"], config["num_anchors"]) == (5, [-1, 1], 512)
    assert (config["markov_rank"], config["markov_head_type"]) == (16, "gated")
    assert config["enable_confidence_head"] and config["confidence_head_with_markov"]
    assert config["tie_word_embeddings"] is False and config["shares_target_embeddings"] is True
    assert config["mask_token_id"] == target.tokenizer.convert_tokens_to_ids("<gh_stars>")
    names = set(load_file(path / "model.safetensors"))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "markov_head.markov_w1.weight",
            "markov_head.gate_proj.bias", "confidence_head.proj.weight", "layers.1.mlp.down_proj.weight"} <= names
    assert "embed_tokens.weight" not in names
    eagle = json.loads((write_drafter(target, tmp_path / "e", "eagle3") / "config.json").read_text())
    assert eagle["architectures"] == [f"{family}Eagle3Model"]
    assert (eagle["num_hidden_layers"], eagle["ttt_length"]) == (1, 5)


@pytest.mark.parametrize("kind", ["dspark", "eagle3"])
def test_round_trip_gives_identical_drafts(target, tmp_path, kind):
    config, state = init_drafter(target, kind, layers=2, markov_rank=16, markov_type="rnn", block_size=5,
                                 target_layer_ids=[0, 2] if kind == "eagle3" else [-1, 1], seed=3)
    first = save_checkpoint(tmp_path / "a", config, state)
    reloaded = load_checkpoint(first, target)
    # write what was loaded (plus the stored embeddings a DeepSpec checkpoint carries) and load again
    full = dict(reloaded.weights, **{"embed_tokens.weight": target.model.embed,
                                     "lm_head.weight": target.model.lm_head})
    second = save_checkpoint(tmp_path / "b", json.loads((first / "config.json").read_text()), full)
    assert json.loads((second / "config.json").read_text())["shares_target_embeddings"] is False
    drafts = []
    for path in (first, second):
        engine = build_engine(EngineConfig(model=str(target.path), method=kind, drafter=str(path),
                                           max_batch=1, max_context=128), target)
        prompt = [5, 6, 7, 8, 9, 10]
        engine.add(request(prompt, temperature=0.8, seed=4))
        engine.step()  # prefill + one round
        seq: Sequence = engine.active[0]
        drafts.append(engine.drafter.propose([seq]).tokens)
    assert drafts[0] == drafts[1]


REFUSALS = [
    ("hidden_size", lambda c, p: c.update(hidden_size=c["hidden_size"] * 2)),
    ("vocab_size", lambda c, p: c.update(vocab_size=1000)),
    ("num_target_layers", lambda c, p: c.update(num_target_layers=36)),
    ("target_layer_ids", lambda c, p: c.update(target_layer_ids=[-1, 3])),    # the final layer
    ("target_layer_ids", lambda c, p: c.update(target_layer_ids=[1, 0])),     # not increasing
    ("mask_token_id", lambda c, p: c.update(mask_token_id=151669)),
    ("rope_theta", lambda c, p: c.update(rope_parameters={"rope_theta": 1e6, "rope_type": "default"})),
    ("markov_head_type", lambda c, p: c.pop("markov_head_type")),
    ("not a drafter", lambda c, p: c.update(architectures=["Qwen3ForCausalLM"])),
    ("unexpected tensor", lambda c, p: c.update(markov_head_type="vanilla")),  # weights are gated
    ("fc.weight", lambda c, p: c.update(target_layer_ids=[-1, 0, 1])),        # fc is [H, 2H]
    ("temperatures must be finite and > 0", lambda c, p: c.update(confidence_temperatures=[1.0, 0.0] + [1.0] * 3)),
    ("block_size: Input should be a valid integer", lambda c, p: c.update(block_size=True)),   # was 1 draft token
    ("hidden_size: Input should be a valid integer", lambda c, p: c.update(hidden_size=str(c["hidden_size"]))),
    ("enable_confidence_head: Input should be a valid boolean", lambda c, p: c.update(enable_confidence_head="no")),
    ("confidence_temperatures_greedy: Value error, temperatures must be finite and > 0",
     lambda c, p: c.update(confidence_temperatures_greedy=[1.0, float("inf")] + [1.0] * 3)),
    ("confidence_offsets has 2 entries", lambda c, p: c.update(confidence_offsets=[0.1, 0.2])),
    ("confidence_offsets: Value error, must be finite", lambda c, p: c.update(confidence_offsets=[float("inf")] * 5)),
    ("confidence_draft_weights_greedy: Value error, must be finite",
     lambda c, p: c.update(confidence_draft_weights_greedy=[float("nan")] * 5)),
    ("confidence_history_weights and confidence_history_prior go together",
     lambda c, p: c.update(confidence_history_weights=[0.5] * 5)),
    ("confidence_history_weights_greedy and confidence_history_prior_greedy go together",
     lambda c, p: c.update(confidence_history_prior_greedy=0.3)),
    ("confidence_history_prior: Value error, must be a rate in \\(0, 1\\)",
     lambda c, p: c.update(confidence_history_weights=[0.5] * 5, confidence_history_prior=1.0)),
    ("confidence_history_weights_greedy has 3 entries",
     lambda c, p: c.update(confidence_history_weights_greedy=[0.5] * 3, confidence_history_prior_greedy=0.3)),
]


@pytest.mark.parametrize("needle,change", REFUSALS)
def test_mismatched_checkpoint_is_refused(target, tmp_path, needle, change):
    path = write_drafter(target, tmp_path / "d", "dspark", markov_type="gated")
    config = json.loads((path / "config.json").read_text())
    change(config, path)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(path, target)


def test_file_problems_are_refused(target, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "missing", target)
    path = write_drafter(target, tmp_path / "d", "dspark")
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(path, target)
    path = write_drafter(target, tmp_path / "e", "dspark")
    weights = load_file(path / "model.safetensors")
    del weights["norm.weight"]
    save_file(weights, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="norm.weight is missing"):
        load_checkpoint(path, target)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path, target)
    # a copy of the weights kept beside them (other weights under the same names): which one is served
    # was the order of the file names
    path = write_drafter(target, tmp_path / "f", "dspark")
    save_file(load_file(write_drafter(target, tmp_path / "g", "dspark", seed=9) / "model.safetensors"),
              path / "model_older.safetensors")
    with pytest.raises(CheckpointError, match="is in both model.safetensors and model_older.safetensors"):
        load_checkpoint(path, target)


def test_a_save_cut_short_leaves_the_earlier_checkpoint(target, tmp_path, monkeypatch):
    """Ctrl-C (or a full disk) while train-drafter exports over an earlier export: the earlier
    checkpoint stays whole and loadable; model.safetensors was written in place, truncated beside
    its config."""
    import engine.drafters.checkpoint

    path = write_drafter(target, tmp_path / "d", "dspark")
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    config, state = init_drafter(target, "dspark", layers=2, markov_rank=16, block_size=5,
                                 target_layer_ids=[-1, 1], seed=8)

    def cut_short(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.drafters.checkpoint, "save_file", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, config, state)
    assert {f.name: f.read_bytes() for f in path.iterdir() if not f.name.endswith(".partial")} == before
    load_checkpoint(path, target)
    monkeypatch.undo()
    save_checkpoint(path, config, state)     # the next save completes, and leaves no partial file
    assert sorted(f.name for f in path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_checkpoint(path, target).weights["fc.weight"], state["fc.weight"])


def test_draft_vocabulary_round_trip_changes_the_digest_only(target, tmp_path):
    path = write_drafter(target, tmp_path / "d", "dspark")
    before = load_checkpoint(path, target)
    assert before.draft_vocab is None
    ids = torch.tensor([0, 5, 6, 900, target.model.args.vocab_size - 1])
    write_draft_vocab(path, ids, {"coverage": "0.5"})
    for name in ("model.safetensors", DRAFT_VOCAB_FILE):   # readable by a node running as another user
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o644, name
    after = load_checkpoint(path, target)
    assert after.draft_vocab.tolist() == ids.tolist()
    assert after.digest != before.digest   # receipts name the drafter that actually ran
    assert after.weights.keys() == before.weights.keys()
    assert not list(path.glob("*.partial"))
    (path / DRAFT_VOCAB_FILE).unlink()     # removing the file restores the full vocabulary
    assert load_checkpoint(path, target).digest == before.digest


@pytest.mark.parametrize("d2t,needle", [
    (torch.tensor([0, -1, 0]), "strictly increasing"),                  # ids 0, 0, 2
    (torch.tensor([5, 2]), "strictly increasing"),                      # ids 5, 3
    (torch.tensor([-1, 0]), "outside the target's vocabulary"),
    (torch.tensor([10**9]), "outside the target's vocabulary"),
    (torch.tensor([0.0, 1.0]), "int32/int64"),
    (torch.zeros(2, 2, dtype=torch.long), "1-D"),
    (torch.zeros(0, dtype=torch.long), "1-D"),
])
def test_bad_draft_vocabulary_is_refused(target, tmp_path, d2t, needle):
    path = write_drafter(target, tmp_path / "d", "eagle3")
    save_file({"d2t": d2t}, path / DRAFT_VOCAB_FILE)
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(path, target)


def test_eagle3_cannot_tap_the_embedding(target, tmp_path):
    path = write_drafter(target, tmp_path / "e", "eagle3")
    config = json.loads((path / "config.json").read_text())
    config["target_layer_ids"] = [-1, 2]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"embedding output \(-1\)"):
        load_checkpoint(path, target)


def test_method_and_architecture_must_agree(target, tmp_path):
    dspark = write_drafter(target, tmp_path / "d", "dspark")
    eagle = write_drafter(target, tmp_path / "e", "eagle3")
    for method, path, needle in [("eagle3", dspark, "not an EAGLE-3"), ("dspark", eagle, "use --method eagle3"),
                                 ("dflash", dspark, "use --method dspark")]:
        with pytest.raises(CheckpointError, match=needle):
            build_engine(EngineConfig(model=str(target.path), method=method, drafter=str(path), max_context=64),
                         target)
