"""Algorithm 1 and the asynchronous variant on hand-made confidences and SPS tables."""

from types import SimpleNamespace

import pytest
import torch

from engine.drafters.base import Proposal
from engine.prefix_scheduler import AdmissionHorizon, PrefixScheduler, algorithm1, capacity, survivals, top_k
from engine.sps import SpsTable, cpu_signature, hardware_id


def table(*sps):
    """SPS by width alone (one request: the width is the token count B of the paper's examples)."""
    return lambda rows, width: sps[min(width, len(sps)) - 1]


def test_appendix_a_stops_before_looking_at_c2():
    """R=1, a_1=0.8, SPS(1,2,3)=(1, .5, .45): Theta_1=0.9 < Theta_0=1, so l=0 whatever c_2 is."""
    for c2 in (0.9, 0.0, 1.0):
        lengths, expected = algorithm1(survivals([torch.tensor([0.8, c2])], [2]), table(1.0, 0.5, 0.45))
        assert lengths == [0] and expected == 0


def test_flat_sps_admits_every_positive_candidate():
    surv = survivals([torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.3, 0.0, 0.9])], [3, 3])
    lengths, expected = algorithm1(surv, table(1.0))
    assert lengths == [3, 1]  # request 1 stops where survival hits zero
    assert abs(expected - (0.9 + 0.45 + 0.045 + 0.3)) < 1e-6


def test_each_step_widens_every_request_that_survives():
    """a: r0=(.9,.81), r1=(.5,.25), r2=(.2,0). Step time grows 30% per width step whatever the rows:
    Theta(W=1)=3; W=2 admits all three first drafts (1.6 more) -> 4.6/1.3=3.54; W=2 -> 3 adds
    .81+.25 -> 5.66/1.6=3.54, not higher: stop. l=(1,1,1)."""
    sps = lambda rows, width: 1 / (1 + 0.3 * (width - 1))
    surv = survivals([torch.tensor([0.9, 0.9]), torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.0])], [2, 2, 2])
    lengths, expected = algorithm1(surv, sps)
    assert lengths == [1, 1, 1]
    assert abs(expected - 1.6) < 1e-6


def test_a_width_no_round_can_pay_for_admits_nothing():
    """Four rows whose first drafts sum to 2.5 expected tokens: a step 70% slower at width 2 costs
    more than they add (6.5 / 1.7 < 4), one 50% slower costs less (6.5 / 1.5 > 4)."""
    surv = survivals([torch.tensor([c]) for c in (0.9, 0.8, 0.7, 0.1)], [1] * 4)
    assert algorithm1(surv, table(1.0, 1 / 1.7))[0] == [0, 0, 0, 0]
    assert algorithm1(surv, table(1.0, 1 / 1.5))[0] == [1, 1, 1, 1]


def test_budget_is_never_exceeded():
    surv = survivals([torch.full((7,), 0.99)] * 4, [7] * 4)
    for budget in (4, 5, 9, 13):
        lengths, _ = algorithm1(surv, table(1.0), budget)
        assert sum(1 + l for l in lengths) <= budget
        k_lengths, _ = top_k(surv, capacity(surv, table(1.0), budget), budget)
        assert sum(1 + l for l in k_lengths) <= budget


def test_capacity_searches_past_a_dip():
    """A jagged curve: Theta dips at B=2 and peaks at B=4; the async capacity finds the peak where
    Algorithm 1 stops at the dip."""
    sps = table(1.0, 0.45, 0.6, 0.55, 0.2)
    surv = survivals([torch.tensor([1.0, 1.0, 1.0, 1.0])], [4])
    assert algorithm1(surv, sps)[0] == [0]
    assert capacity(surv, sps) == 3  # Theta: 1, .9, 1.8, 2.2, 1.0


def test_top_k_is_prefix_closed():
    surv = survivals([torch.tensor([0.9, 0.9, 0.9]), torch.tensor([0.95, 0.2, 1.0])], [3, 3])
    lengths, _ = top_k(surv, 3)
    assert lengths == [2, 1]  # 0.95 (r1 j1), 0.9 (r0 j1), 0.81 (r0 j2)


class _Seq:
    def __init__(self, rid):
        self.request_id = rid


def test_async_uses_confidences_from_two_rounds_earlier():
    """Round 1 and 2 have no history, so capacity is 0; in round 3 capacity comes from round 1's
    confidences (high) even though this round's are low, and admission uses this round's order."""
    sched = PrefixScheduler(table(1.0), mode="async")
    seqs = [_Seq("a")]
    high, low = torch.tensor([0.9, 0.9, 0.9]), torch.tensor([0.5, 0.1, 0.1])
    proposal = lambda conf: Proposal(tokens=[[1, 2, 3]], probs=[None], confidence=[conf])
    assert sched(seqs, proposal(high), [3])[0] == [0]
    assert sched(seqs, proposal(low), [3])[0] == [0]
    assert sched(seqs, proposal(low), [3])[0] == [3]   # K=3 from round 1's high confidences
    assert sched(seqs, proposal(high), [3])[0] == [3]  # K from round 2's low ones: 3 with flat SPS


def test_async_history_skips_rounds_without_a_proposal():
    """A request the backoff lets draft every 4th round: its rounds without a proposal are not
    remembered, so at its third proposal it has confidences two proposals back."""
    sched = PrefixScheduler(table(1.0), mode="async")
    seqs = [_Seq("a")]
    high = Proposal(tokens=[[1, 2, 3]], probs=[None], confidence=[torch.tensor([0.9, 0.9, 0.9])])
    paused = Proposal(tokens=[[]], probs=[None], confidence=[None])
    budgets = [sched(seqs, high if i % 4 == 0 else paused, [3])[0][0] for i in range(13)]
    assert budgets[::4] == [0, 0, 3, 3] and sum(budgets) == 6


def test_sps_table_interpolates_and_smooths():
    t = SpsTable(rows=[1, 2, 4], widths=[1, 2], measured=[[10.0, 11.0], [8.0, 5.0], [4.0, 2.0]], context=8)
    assert t(1, 1) == 10.0 and t(1, 2) == 10.0  # noise that says "faster when wider" is smoothed away
    assert t(2, 2) == 5.0
    assert abs(1 / t(3, 1) - (1 / 8 + 1 / 4) / 2) < 1e-12  # step time interpolated between 2 and 4 rows
    assert abs(t(8, 1) - 2.0) < 1e-12   # beyond the profiled rows, time grows with R
    assert abs(t(4, 4) - 1.0) < 1e-12   # and beyond the profiled widths, with W


def test_sps_table_refuses_a_file_that_does_not_match_its_shape(tmp_path):
    path = tmp_path / "sps.json"
    SpsTable(rows=[1, 2], widths=[1, 2], measured=[[3.0, 2.0], [2.0, 1.0]], context=8).save(path)
    assert SpsTable.load(path)(2, 2) == 1.0
    path.write_text(path.read_text().replace("[2.0, 1.0]", "[2.0]"))
    with pytest.raises(ValueError, match="do not match"):
        SpsTable.load(path)


AVX2_HOST = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 fma

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 fma
"""


def test_cpu_signature_tells_hosts_apart_by_flags_not_by_name():
    """The same VM name with and without AMX measures different SPS tables, so a cached profile
    must not carry over; flag order and later processors do not matter."""
    amx = AVX2_HOST.replace("avx2 fma", "fma avx2 amx_bf16 avx512_bf16", 1)
    assert cpu_signature(AVX2_HOST) == "Intel(R) Xeon(R) Processor|avx2 fma fpu sse2"
    assert cpu_signature(amx) != cpu_signature(AVX2_HOST)
    assert cpu_signature(AVX2_HOST.replace("fpu sse2 avx2 fma", "fma avx2 sse2 fpu", 1)) == cpu_signature(AVX2_HOST)
    assert cpu_signature("").endswith("|")  # off Linux: the platform's processor string, no flags
    assert len(hardware_id("cpu")) == 8 and hardware_id("cpu") == hardware_id("cpu")


def drafted_with_horizon(conf: torch.Tensor, caps: list[int], sps, budget, fixed: dict[int, torch.Tensor]):
    """Draft rows slot by slot as the DSpark drafter does, stopping where the horizon says:
    the proposal's confidences per row (the fixed rows' whole, the others' up to the stop)."""
    seqs = [SimpleNamespace(request_id=f"r{r}") for r in range(len(conf))]
    horizon = AdmissionHorizon(seqs, caps, sps, budget)
    for r, c in fixed.items():
        horizon.fix(seqs[r], c)
    drafted = [seqs[r] for r in range(len(conf)) if r not in fixed]
    rows = torch.tensor([r for r in range(len(conf)) if r not in fixed], dtype=torch.long)
    slots = conf.shape[1]
    for slot in range(1, conf.shape[1] + 1):
        if not horizon.more(drafted, slot, conf[rows, slot - 1]):
            slots = slot
            break
    return [fixed[r] if r in fixed else conf[r, :slots] for r in range(len(conf))], slots


@pytest.mark.parametrize("seed", range(6))
def test_the_horizon_never_changes_what_algorithm1_admits(seed):
    """Whatever the confidences, caps, lookup rows, token budget and SPS table (jagged ones too),
    Algorithm 1 admits from proposals cut at the horizon exactly what it admits from whole blocks,
    and the cut comes one slot after the last admitted position: the slot whose step ended the walk."""
    g = torch.Generator().manual_seed(seed)
    for trial in range(200):
        R, block = int(torch.randint(1, 12, (1,), generator=g)), 7
        conf = torch.rand(R, block, generator=g) ** (0.3 + 2 * torch.rand(1, generator=g).item())
        caps = torch.randint(0, block + 1, (R,), generator=g).tolist() if trial % 3 == 0 else [block] * R
        fixed = {r: torch.rand(int(torch.randint(1, block + 1, (1,), generator=g)), generator=g)
                 for r in range(R) if trial % 2 and torch.rand(1, generator=g) < 0.3}
        step = 0.02 + 0.3 * torch.rand(1, generator=g).item()
        jitter = 1 + 0.1 * torch.rand(block + 1, generator=g) * (trial % 4 == 1)
        def sps(rows, width, step=step, jitter=jitter):
            return float(jitter[width - 1]) / (1 + step * rows ** 0.5 * (width - 1))
        budget = None if trial % 5 else R + int(torch.randint(0, 3 * R, (1,), generator=g))
        whole = [fixed.get(r, conf[r]) for r in range(R)]
        cut, slots = drafted_with_horizon(conf, caps, sps, budget, fixed)
        lengths, expected = algorithm1(survivals(whole, caps), sps, budget)
        assert algorithm1(survivals(cut, caps), sps, budget) == (lengths, expected)
        assert slots == min(max(lengths) + 1, block)
