"""The two commands refuse bad input with a message naming the problem (exit 2, nothing written)."""

from __future__ import annotations

import re

import pytest
import torch

from engine.drafters.checkpoint import load_checkpoint, save_checkpoint, write_draft_vocab
from engine.drafters.init import init_drafter
from node.cli import main


@pytest.mark.parametrize("argv,message", [
    (["--target-layers", "3,1"], "strictly increasing"),
    (["--block-size", "1"], "--block-size"),
    (["--lr", "-1"], "--lr"),
    (["--resume"], "train_state.pt does not exist"),
    (["--kind", "eagle3", "--target-layers=-1,1"], "cannot tap the embedding"),
    (["--gen-temperatures", "0,3"], "temperatures must lie in [0, 2]"),
    (["--gen-skip", "-1"], "--gen-skip"),
    (["--gen-skip", "10000000"], "passes over all"),
    (["--device", "gpu"], "'gpu' is not a torch device"),
    (["--save-every", "0"], "--save-every"),
    (["--device", "cuda:64"], "is not available: CUDA devices visible"),
    (["--init-from", "/nonexistent/drafter"], "no config.json"),
    (["--init-from", "/nonexistent/drafter", "--layers", "2"], "drop --layers"),
    (["--init-from", "/nonexistent/drafter", "--resume"], "--init-from starts a new one"),
    # the final layer (3 of 4) and layers the target lacks: a drafter no target could load
    (["--target-layers", "1,3"], "--target-layers [1, 3] do not fit the target's 4 layers (allowed: -1..2"),
    (["--target-layers=-5,1"], "do not fit the target's 4 layers"),
    (["--threads", "100000"], "--threads: Input should be less than or equal to 1024"),   # torch segfaulted
    (["--seed", str(2**64)], "--seed: Input should be less than 4294967296"),
    # it said "give --gen-minutes or --stdlib-tokens" to a run that gave --gen-minutes
    (["--gen-minutes", "1e-9", "--stdlib-tokens", "0"],
     "no training data: --gen-minutes 1e-09 gave no response of 14+ tokens and --stdlib-tokens is 0"),
])
def test_train_drafter_refuses(target, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = main(["train-drafter", "--target", str(target.path), "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--steps", "1", "--stdlib-tokens", "500", "--gen-minutes", "0.01", *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "config.json").exists()
    assert not (tmp_path / "cache").exists()    # refused before any data was generated or scored


def test_train_drafter_refuses_an_out_or_cache_dir_it_cannot_use(target, cache_dir, tmp_path, capsys):
    """A file where a directory goes, and an --out holding a drafter (the --init-from drafter itself,
    the shipped one), are refused before the target is loaded; they were a FileExistsError traceback
    after the cache was built, or the drafter was replaced."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    common = ["train-drafter", "--target", str(target.path), "--steps", "1", "--anchors", "8", "--batch", "2"]
    for argv, message in (
            (["--out", str(a_file), "--cache-dir", str(cache_dir)], f"--out {a_file}: {a_file} is a file"),
            (["--out", str(a_file / "run"), "--cache-dir", str(cache_dir)], f"{a_file} is a file, not a directory"),
            (["--out", str(tmp_path / "o"), "--cache-dir", str(a_file)], f"--cache-dir {a_file}: {a_file} is a file")):
        assert main([*common, *argv]) == 2
        assert message in capsys.readouterr().err
    assert a_file.read_text() == "not a directory" and not (tmp_path / "o").exists()
    # the cache's shards beside the drafter's weights: a drafter directory that would not load
    stamp = {f.name: f.stat().st_mtime_ns for f in cache_dir.iterdir()}
    assert main([*common, "--out", str(cache_dir / "."), "--cache-dir", str(cache_dir)]) == 2
    assert "--out and --cache-dir are the same directory" in capsys.readouterr().err
    assert {f.name: f.stat().st_mtime_ns for f in cache_dir.iterdir()} == stamp

    config, state = init_drafter(target, "dspark", layers=1, markov_rank=8, block_size=4, target_layer_ids=[-1, 1])
    drafter = save_checkpoint(tmp_path / "drafter", config, state)
    before = {f.name: f.read_bytes() for f in drafter.iterdir()}
    assert main([*common, "--out", str(drafter), "--init-from", str(drafter), "--cache-dir", str(cache_dir)]) == 2
    assert "holds a drafter (config.json, model.safetensors) and no run to resume" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in drafter.iterdir()} == before
    # --cache-only writes nothing there: any --out does
    for out in (drafter, a_file):
        assert main([*common, "--out", str(out), "--cache-dir", str(cache_dir), "--target-layers=-1,1",
                     "--cache-only"]) == 0
    assert {f.name: f.read_bytes() for f in drafter.iterdir()} == before and a_file.read_text() == "not a directory"


def test_train_drafter_interrupted_before_training_says_there_is_nothing_to_resume(target, tmp_path, capsys,
                                                                                     monkeypatch):
    import engine.train.pipeline

    def ctrl_c(*args, **kwargs):   # Ctrl-C while the target scores the samples
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.train.pipeline, "build_cache", ctrl_c)
    out = tmp_path / "out"
    assert main(["train-drafter", "--target", str(target.path), "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--stdlib-tokens", "500", "--gen-minutes", "0", "--steps", "1"]) == 130
    err = capsys.readouterr().err
    assert "there is no state to resume" in err and "--resume" not in err


def test_train_drafter_refuses_a_cache_of_other_layers(target, cache_dir, tmp_path, capsys):
    code = main(["train-drafter", "--target", str(target.path), "--out", str(tmp_path / "o"), "--cache-dir",
                 str(cache_dir), "--target-layers=-1,2", "--steps", "1"])
    assert code == 2
    assert "target_layer_ids" in capsys.readouterr().err


def test_calibrate_refuses_a_drafter_without_confidence_head(target, tmp_path, capsys):
    config, state = init_drafter(target, "dflash", layers=1, block_size=4, target_layer_ids=[-1, 1])
    save_checkpoint(tmp_path, config, state)
    assert main(["calibrate", "--drafter", str(tmp_path), "--model", str(target.path)]) == 2
    assert "no confidence head" in capsys.readouterr().err
    assert main(["calibrate", "--drafter", str(tmp_path / "missing"), "--model", str(target.path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["calibrate", "--drafter", str(tmp_path), "--model", str(target.path), "--device", "gpu"]) == 2
    assert "'gpu' is not a torch device" in capsys.readouterr().err


def test_calibrate_refuses_a_drafter_directory_it_cannot_store_the_fit_in_before_decoding(target, tmp_path, capsys):
    """It decoded for minutes and then died on the write with a traceback (root writes anywhere, so a
    directory in the way of the temporary file stands for a read-only one here)."""
    from engine.drafters.checkpoint import CheckpointError
    from engine.train.calibrate import store_config

    config, state = init_drafter(target, "dspark", layers=1, markov_rank=8, block_size=4, target_layer_ids=[-1, 1])
    drafter = save_checkpoint(tmp_path / "drafter", config, state)
    (drafter / "config.tmp").mkdir()
    before = (drafter / "config.json").read_text()
    argv = ["calibrate", "--drafter", str(drafter), "--model", str(target.path), "--limit", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot store the fit in {drafter / 'config.json'}" in err and "--dry-run" in err
    with pytest.raises(CheckpointError, match="cannot store the fit"):
        store_config(drafter / "config.json", {"block_size": 4})
    assert (drafter / "config.json").read_text() == before
    assert main([*argv, "--max-new-tokens", "4", "--dry-run"]) == 0     # reporting needs no write


def test_train_drafter_end_to_end_builds_one_cache_for_two_kinds(target, tmp_path, capsys):
    """Generated responses (decoded in bf16) + stdlib text -> cache (--cache-only) -> a DSpark run in
    bf16 and a DFlash run in fp32 from it."""
    import json

    cache = tmp_path / "cache"
    common = ["--target", str(target.path), "--cache-dir", str(cache), "--target-layers=-1,1", "--max-len", "96",
              "--gen-minutes", "0.1", "--gen-batch", "4", "--gen-max-new-tokens", "24", "--stdlib-tokens", "1500",
              "--gen-temperatures", "0,0.7",
              "--block-size", "4", "--anchors", "8", "--batch", "2", "--threads", "1"]
    assert main(["train-drafter", "--out", str(tmp_path / "x"), "--cache-only", "--dtype", "bfloat16", *common]) == 0
    built = json.loads(capsys.readouterr().out)
    sources = built["sources"]
    assert sources["generated"]["responses"] > 0 and sources["stdlib"]["chunks"] > 0
    assert "none from shared/eval" in sources["generated"]["prompts"]
    assert sources["generated"]["sampling"].startswith("T=0 (greedy), T=0.7 top_p=0.8")
    assert sources["generated"]["dtype"] == "bfloat16"
    assert (cache / "manifest.json").exists() and not (tmp_path / "x" / "config.json").exists()
    stamp = (cache / "manifest.json").stat().st_mtime_ns
    for kind, dtype in (("dspark", "bfloat16"), ("dflash", "float32")):
        out = tmp_path / kind
        assert main(["train-drafter", "--kind", kind, "--out", str(out), "--steps", "3", "--dtype", dtype,
                     *common]) == 0
        printed = capsys.readouterr()
        summary = json.loads(printed.out)
        # the --gen-* flags given again make no new data here, and the run says so
        assert f"using the target cache in {cache} as built (--gen-*, --stdlib-tokens" in printed.err
        assert summary["steps_done"] == 3 and summary["data"]["tokens"] == built["tokens"]
        assert summary["dtype"] == dtype
        assert summary["device"] == "cpu"    # where it was trained, recorded with the drafter
        config = json.loads((out / "config.json").read_text())
        assert config["training"]["data"]["sources"] == sources and (out / "model.safetensors").exists()
    assert (cache / "manifest.json").stat().st_mtime_ns == stamp   # reused, not rebuilt


def test_train_drafter_init_from_continues_an_exported_drafter(target, cache_dir, tmp_path, capsys):
    """--init-from starts from the drafter's weights (not a fresh init), drops its calibration, keeps
    its draft vocabulary, records where it came from, and refuses another kind or other target layers."""
    import json

    from safetensors.torch import load_file

    common = ["--target", str(target.path), "--cache-dir", str(cache_dir), "--anchors", "8", "--batch", "2",
              "--threads", "1"]
    base = tmp_path / "base"
    assert main(["train-drafter", "--out", str(base), "--steps", "2", "--target-layers=-1,1", "--layers", "1",
                 "--markov-rank", "8", "--block-size", "4", *common]) == 0
    capsys.readouterr()
    config = json.loads((base / "config.json").read_text())
    config.update(confidence_temperatures=[1.5] * 4, confidence_offsets=[0.1] * 4, calibration={"method": "STS"},
                  confidence_temperatures_greedy=[0.5] * 4, confidence_offsets_greedy=[0.2] * 4,
                  confidence_draft_weights=[0.3] * 4, confidence_draft_weights_greedy=[0.4] * 4,
                  confidence_history_weights=[0.5] * 4, confidence_history_prior=0.3)
    (base / "config.json").write_text(json.dumps(config))
    subset = torch.tensor([0, 3, 7, 20])
    write_draft_vocab(base, subset, {})

    tuned = tmp_path / "tuned"   # an LR far below bf16's resolution: the export must equal the start
    assert main(["train-drafter", "--out", str(tuned), "--init-from", str(base), "--steps", "1", "--lr", "1e-12",
                 *common]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["init_from"]["path"] == str(base) and summary["init_from"]["training"]["steps_done"] == 2
    start, got = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert start.keys() == got.keys() and all(torch.equal(start[k], got[k]) for k in start)
    fresh = tmp_path / "fresh"
    assert main(["train-drafter", "--out", str(fresh), "--steps", "1", "--lr", "1e-12", "--target-layers=-1,1",
                 "--layers", "1", "--markov-rank", "8", "--block-size", "4", *common]) == 0
    assert not torch.equal(load_file(fresh / "model.safetensors")["fc.weight"], got["fc.weight"])
    stored = json.loads((tuned / "config.json").read_text())
    assert not {"confidence_temperatures", "calibration", "confidence_temperatures_greedy",
                "confidence_offsets_greedy", "confidence_draft_weights", "confidence_draft_weights_greedy",
                "confidence_history_weights", "confidence_history_prior"} & stored.keys()
    assert stored["markov_rank"] == 8 and stored["block_size"] == 4
    assert torch.equal(load_checkpoint(tuned, target).draft_vocab, subset)

    capsys.readouterr()
    assert main(["train-drafter", "--kind", "dflash", "--out", str(tmp_path / "k"), "--init-from", str(base),
                 *common]) == 2
    assert "is a dspark drafter, not dflash" in capsys.readouterr().err
    assert main(["train-drafter", "--out", str(tmp_path / "l"), "--init-from", str(base), "--target-layers", "0,1",
                 *common]) == 2
    assert "taps target layers [-1, 1], not [0, 1]" in capsys.readouterr().err
    config, state = init_drafter(target, "dflash", layers=1, block_size=4, target_layer_ids=[-1, 1])
    save_checkpoint(tmp_path / "dflash", config, state)
    assert main(["train-drafter", "--out", str(tmp_path / "m"), "--init-from", str(tmp_path / "dflash"),
                 *common]) == 2
    assert "is a dflash drafter, not dspark" in capsys.readouterr().err


def test_calibrate_fits_and_stores_temperatures_offsets_and_draft_weights(target, tmp_path, capsys):
    import json

    from engine.drafters.checkpoint import load_checkpoint

    config, state = init_drafter(target, "dspark", layers=1, markov_rank=8, block_size=4, target_layer_ids=[-1, 1])
    save_checkpoint(tmp_path, config, state)
    argv = ["calibrate", "--drafter", str(tmp_path), "--model", str(target.path), "--limit", "4",
            "--max-new-tokens", "12"]
    before = (tmp_path / "config.json").read_text()
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "offsets" in out and (tmp_path / "config.json").read_text() == before
    assert "rounds of the fitting set" in out
    # --holdout: every 2nd prompt is decoded apart and the report is measured on it alone
    assert main([*argv, "--dry-run", "--holdout", "0.5"]) == 0
    fitted, reported = (int(n) for n in re.search(r"fitted on (\d+) rounds; reported on (\d+) rounds of 2 held-out",
                                                  capsys.readouterr().out).groups())
    assert fitted > 0 and reported > 0 and (tmp_path / "config.json").read_text() == before
    for bad, message in ((["--holdout", "0.9"], "--holdout in [0, 0.5]"),
                         (["--holdout", "0.5", "--limit", "1"], "leaves no prompt to fit on or none to report on")):
        assert main([*argv, *bad]) == 2 and message in capsys.readouterr().err
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["confidence_temperatures"] == printed["temperatures"] and len(printed["temperatures"]) == 4
    assert stored["confidence_offsets"] == printed["offsets"] and len(printed["offsets"]) == 4
    assert stored["confidence_draft_weights"] == printed["draft_weights"] and len(printed["draft_weights"]) == 4
    assert stored["calibration"]["method"] == "STS with offsets, draft and history weights"
    assert stored["confidence_history_weights"] == printed["history_weights"] and len(printed["history_weights"]) == 4
    assert stored["confidence_history_prior"] == printed["history_prior"] and 0 < printed["history_prior"] < 1
    assert stored["calibration"]["prompts"] == 4
    assert stored["calibration"]["prompt_source"]["pool"].startswith("engine/train/calibrate.py default_prompts")
    loaded = load_checkpoint(tmp_path, target).config
    assert loaded.confidence_offsets == printed["offsets"]
    assert loaded.confidence_draft_weights == printed["draft_weights"]
    assert main([*argv, "--temperature-only"]) == 0
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["confidence_offsets"] == stored["confidence_draft_weights"] == [0.0] * 4
    assert "confidence_history_weights" not in stored and "confidence_history_prior" not in stored

    # --temperature 0 fits the greedy requests' pair beside the sampled one, which it leaves alone
    sampled = json.loads((tmp_path / "config.json").read_text())
    capsys.readouterr()
    assert main([*argv, "--temperature", "0"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["confidence_temperatures_greedy"] == printed["temperatures"]
    assert stored["confidence_offsets_greedy"] == printed["offsets"]
    assert stored["confidence_draft_weights_greedy"] == printed["draft_weights"]
    assert stored["calibration_greedy"]["temperature"] == 0
    for key in ("confidence_temperatures", "confidence_offsets", "confidence_draft_weights", "calibration"):
        assert stored[key] == sampled[key]
    loaded = load_checkpoint(tmp_path, target).config
    assert loaded.confidence_offsets_greedy == printed["offsets"]
    assert main([*argv, "--temperature", "-1"]) == 2


def test_train_drafter_resume_refuses_another_drafter_and_keeps_the_whole_record(target, cache_dir, tmp_path,
                                                                                  capsys):
    """--resume rebuilds the drafter the run started with: architecture flags or target layers that
    differ were ignored (or trained on another cache's taps), and are refused before any cache is
    built; a missing draft_config.json was a traceback; a finished run resumed again exported an
    empty training record."""
    import json

    out = tmp_path / "run"
    common = ["train-drafter", "--target", str(target.path), "--out", str(out), "--cache-dir", str(cache_dir),
              "--steps", "2", "--anchors", "8", "--batch", "2", "--threads", "1", "--block-size", "4",
              "--target-layers=-1,1"]
    assert main(common) == 0
    first = json.loads(capsys.readouterr().out)
    for extra, message in ((["--block-size", "5"], "was started with --block-size 4 (asked: 5)"),
                           (["--layers", "2"], "--layers 1 (asked: 2)"),
                           (["--target-layers", "0,1", "--cache-dir", str(tmp_path / "other-cache")],
                            "--target-layers [-1, 1] (asked: [0, 1])"),
                           (["--lr", "0.01"], "--lr 0.0006 (asked: 0.01)")):
        assert main([*common, "--resume", *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "other-cache").exists()

    assert main([*common, "--resume"]) == 0     # the same command again: re-exported, the record kept
    summary = json.loads(capsys.readouterr().out)
    assert summary["final_accept"] == first["final_accept"] and len(summary["final_accept"]) == 4
    assert len(json.loads((out / "train_log.json").read_text())) == 2

    (out / "draft_config.json").unlink()
    assert main([*common, "--resume"]) == 2
    assert "draft_config.json is missing" in capsys.readouterr().err


def test_calibrate_records_the_prompt_file_it_fitted_on(target, tmp_path, capsys):
    """A fit on a --prompts file (an evaluation set from shared/eval, say) records the file and its
    digest with the calibration; nothing said where the prompts came from. A file that is not UTF-8
    is refused naming it (it was the codec's message alone)."""
    import hashlib
    import json

    config, state = init_drafter(target, "dspark", layers=1, markov_rank=8, block_size=4, target_layer_ids=[-1, 1])
    drafter = save_checkpoint(tmp_path / "drafter", config, state)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"Count to {n}."]}) + "\n" for n in range(3, 6)))
    argv = ["calibrate", "--drafter", str(drafter), "--model", str(target.path), "--limit", "3",
            "--max-new-tokens", "8"]
    assert main([*argv, "--prompts", str(prompts)]) == 0
    record = json.loads((drafter / "config.json").read_text())["calibration"]
    assert record["prompt_source"] == {"file": str(prompts.resolve()),
                                       "sha256": hashlib.sha256(prompts.read_bytes()).hexdigest()}
    assert record["prompts"] == 3

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps({"turns": ["caf\u00e9"]}, ensure_ascii=False).encode("latin-1"))
    capsys.readouterr()
    assert main([*argv, "--prompts", str(latin1)]) == 2
    assert f"{latin1} is not UTF-8 text" in capsys.readouterr().err


def test_train_drafter_resume_refuses_a_cache_rebuilt_with_other_data(target, tmp_path, capsys):
    """The default cache directory is named by the target and layers alone: deleted and built again
    with other data, it was trained on by a resumed run as if nothing had changed."""
    import shutil

    cache, out = tmp_path / "cache", tmp_path / "run"
    build = ["train-drafter", "--target", str(target.path), "--out", str(tmp_path / "unused"), "--cache-dir",
             str(cache), "--target-layers=-1,1", "--max-len", "96", "--gen-minutes", "0", "--cache-only"]
    train = ["train-drafter", "--target", str(target.path), "--out", str(out), "--cache-dir", str(cache),
             "--target-layers=-1,1", "--steps", "2", "--anchors", "8", "--batch", "2", "--block-size", "4"]
    assert main([*build, "--stdlib-tokens", "600"]) == 0 and main(train) == 0
    shutil.rmtree(cache)
    assert main([*build, "--stdlib-tokens", "900"]) == 0
    capsys.readouterr()
    assert main([*train, "--resume"]) == 2
    assert "is a run saved with --cache-dir data digest" in capsys.readouterr().err
