"""The draft vocabulary from a target cache: what is counted, which tokens are kept, and the command
that stores them with a drafter (bad input refused, nothing written)."""

from __future__ import annotations

import pytest
import torch

from engine.drafters.checkpoint import DRAFT_VOCAB_FILE, load_checkpoint
from engine.train.draft_vocab import frequent_tokens, target_choice_counts
from node.cli import main
from tests.drafters.helpers import write_drafter


def _shard(*sequences: tuple[list[int], list[int]]) -> dict[str, torch.Tensor]:
    """A shard as read_shards gives it: (top-1 choices, loss mask) per sequence, concatenated."""
    lengths = [len(choices) for choices, _ in sequences]
    return {"topk_ids": torch.tensor([[c, 9] for choices, _ in sequences for c in choices]),
            "loss_mask": torch.tensor([m for _, mask in sequences for m in mask], dtype=torch.bool),
            "offsets": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])}


def test_counts_the_targets_argmax_where_the_next_token_is_supervised():
    # position t's top-1 predicts token t+1: counted iff loss_mask[t+1]; a sequence's last position
    # predicts nothing (here the 4 before the next sequence's supervised 3s)
    shards = [_shard(([1, 2, 3, 4], [0, 0, 1, 1]), ([3, 3], [1, 1])), _shard(([5, 6], [1, 1]))]
    counts = target_choice_counts(shards, vocab_size=10)
    assert counts.tolist() == [0, 0, 1, 2, 0, 1, 0, 0, 0, 0]


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
    """The command counts from the shards' top-k ids and masks alone; the same count over the fully
    loaded sequences gives the same subset."""
    drafter = write_drafter(target, tmp_path / "d", "eagle3")
    code = main(["draft-vocab", "--drafter", str(drafter), "--cache-dir", str(cache_dir), "--size", "64",
                 "--model", str(target.path)])
    assert code == 0, capsys.readouterr().err
    loaded = [{"topk_ids": s.topk_ids, "loss_mask": s.loss_mask, "offsets": torch.tensor([0, len(s.input_ids)])}
              for s in sequences]
    want, coverage = frequent_tokens(target_choice_counts(loaded, target.model.args.vocab_size), 64)
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
