"""The two commands refuse bad input with a message naming the problem (exit 2, nothing written)."""

from __future__ import annotations

import pytest

from engine.drafters.checkpoint import save_checkpoint
from engine.drafters.init import init_drafter
from node.cli import main


@pytest.mark.parametrize("argv,message", [
    (["--target-layers", "3,1"], "strictly increasing"),
    (["--block-size", "1"], "--block-size"),
    (["--lr", "-1"], "--lr"),
    (["--resume"], "train_state.pt does not exist"),
    (["--kind", "eagle3", "--target-layers=-1,1"], "cannot tap the embedding"),
])
def test_train_drafter_refuses(target, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = main(["train-drafter", "--target", str(target.path), "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (out / "config.json").exists()


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
