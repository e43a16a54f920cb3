import torch

from engine.drafters.context import PendingContext


def test_backlog_is_taken_whole_in_position_order_then_empty():
    pending = PendingContext()
    feats = torch.arange(12.0).reshape(6, 2)
    pending.add(feats[:3])
    pending.add(None)              # a round whose forward returned no taps
    pending.add(feats[3:3])        # nothing committed
    pending.add(feats[3:4])
    pending.add(feats[4:])
    assert len(pending) == 6
    backlog, start = pending.take(kv_len=6)
    assert start == 0 and torch.equal(backlog, feats)
    assert len(pending) == 0 and pending.cached == 6
    assert pending.take(kv_len=6) == (None, 6)


def test_next_backlog_starts_where_the_cache_ends():
    pending = PendingContext([torch.zeros(4, 2)])
    pending.take(kv_len=4)
    pending.add(torch.ones(2, 2))
    backlog, start = pending.take(kv_len=6)
    assert start == 4 and backlog.shape == (2, 2)
