"""The draft vocabulary from a target cache: what is counted, which tokens are kept, and the command
that stores them with a drafter (bad input refused, nothing written)."""

from __future__ import annotations

import pytest
import torch

from engine.drafters.checkpoint import DRAFT_VOCAB_FILE, load_checkpoint
from engine.train.cache import CachedSequence
from engine.train.draft_vocab import frequent_tokens, target_choice_counts
from node.cli import main
from tests.drafters.helpers import write_drafter


def _seq(choices: list[int], mask: list[int]) -> CachedSequence:
    n = len(choices)
    return CachedSequence(input_ids=torch.zeros(n, dtype=torch.long), loss_mask=torch.tensor(mask, dtype=torch.bool),
                          taps=torch.zeros(n, 1), last_hidden=torch.zeros(n, 1),
                          topk_ids=torch.tensor([[c, 9] for c in choices]), topk_probs=torch.ones(n, 2))


def test_counts_the_targets_argmax_where_the_next_token_is_supervised():
    # position t's top-1 predicts token t+1: counted iff loss_mask[t+1]; the last position predicts nothing
    counts = target_choice_counts([_seq([1, 2, 3, 4], [0, 0, 1, 1]), _seq([3, 3], [1, 1])], vocab_size=10)
    assert counts.tolist() == [0, 0, 1, 2, 0, 0, 0, 0, 0, 0]


def test_keeps_the_most_frequent_tokens_in_increasing_order_ties_by_id():
    counts = torch.tensor([5, 0, 7, 5, 5, 1])
    ids, coverage = frequent_tokens(counts, 3)
    assert ids.tolist() == [0, 2, 3]              # 7, then the first two of the three 5s
    assert coverage == pytest.approx(17 / 23)
    assert frequent_tokens(counts, 6)[1] == 1.0
    for size in (0, 7):
        with pytest.raises(ValueError, match="1..6"):
            frequent_tokens(counts, size)
    with pytest.raises(ValueError, match="no supervised positions"):
        frequent_tokens(torch.zeros(4, dtype=torch.long), 2)


def test_draft_vocab_command_stores_the_subset_with_the_drafter(target, cache_dir, sequences, tmp_path, capsys):
    drafter = write_drafter(target, tmp_path / "d", "eagle3")
    code = main(["draft-vocab", "--drafter", str(drafter), "--cache-dir", str(cache_dir), "--size", "64",
                 "--model", str(target.path)])
    assert code == 0, capsys.readouterr().err
    want, coverage = frequent_tokens(target_choice_counts(sequences, target.model.args.vocab_size), 64)
    assert load_checkpoint(drafter, target).draft_vocab.tolist() == want.tolist()
    assert f"{100 * coverage:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--size", "0"], "--size must be at least 1"),
    (["--size", "10000000"], "must be in 1.."),
    (["--cache-dir", "{tmp}/nowhere"], "no manifest.json"),
    (["--drafter", "{tmp}/missing"], "no config.json"),
])
def test_draft_vocab_command_refuses(target, cache_dir, tmp_path, capsys, argv, message):
    drafter = write_drafter(target, tmp_path / "d", "dspark")
    args = {"--drafter": str(drafter), "--cache-dir": str(cache_dir), "--size": "64"}
    args.update(zip(argv[::2], (a.format(tmp=tmp_path) for a in argv[1::2])))
    code = main(["draft-vocab", *(x for kv in args.items() for x in kv), "--model", str(target.path)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (drafter / DRAFT_VOCAB_FILE).exists()
