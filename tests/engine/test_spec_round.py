"""The round's accounting: what the stats a receipt signs count of a round cut short by a stop string."""

import pytest
import torch

from engine.api import GenerationRequest, SamplingParams
from engine.calibration import record
from engine.sequence import Sequence
from engine.spec_round import _count, uncount_dropped


def counted(verified: int, accepted: int) -> Sequence:
    """A request after one round of 6 drafts, `verified` of them verified and `accepted` accepted."""
    seq = Sequence(GenerationRequest("r", (1,), SamplingParams()), torch.Generator(), [1, 2], prompt_len=1)
    confidence = torch.linspace(0.9, 0.4, 6)
    _count(seq, "own", 6, verified, accepted)
    record(seq.stats, confidence, torch.zeros(6, 2), verified, accepted)
    seq.last_round = ("own", verified, accepted, True)
    return seq


@pytest.mark.parametrize("verified,accepted,kept", [(5, 4, 1), (5, 5, 0), (5, 3, 3), (6, 6, 2), (5, 4, 4)])
def test_a_round_cut_after_its_kept_tokens_counts_as_one_that_accepted_only_those(verified, accepted, kept):
    seq = counted(verified, accepted)
    uncount_dropped(seq, kept)
    assert seq.stats == counted(verified, min(accepted, kept)).stats
