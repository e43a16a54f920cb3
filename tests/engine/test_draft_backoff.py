"""Draft backoff, per request: after a drafted round that did not pay for that request (it verified
nothing, or its share of the round committed tokens more slowly than plain decoding would have) it
drafts every 2nd, 4th, ... round, on a grid all requests share; a round that pays puts it back to
every round; a request that joins starts at the period of the running ones and of those that left."""

from engine.api import RoundReport
from engine.draft_backoff import DraftBackoff


def round_report(budgets: tuple[int, ...], committed: int, seconds: float, draft_seconds: float = 0.0,
                 drafted: int | None = None) -> RoundReport:
    drafted = len(budgets) if drafted is None else drafted
    return RoundReport(batch_size=len(budgets), drafted=drafted, verify_tokens=len(budgets) + sum(budgets),
                       budgets=budgets, expected_accepted=0.0, accepted=committed - len(budgets),
                       committed=committed, draft_seconds=draft_seconds, schedule_seconds=0.0,
                       verify_seconds=seconds - draft_seconds, round_seconds=seconds)


NOTHING, SOMETHING = round_report((0,), 1, 0.2), round_report((3,), 2, 0.2)


def pattern(backoff: DraftBackoff, outcomes: list[RoundReport], rounds: int, plain_seconds: float | None = None,
            rid: str = "a") -> str:
    """One request alone: D for a round it drafted (and the next outcome happened), . for a skip."""
    out, it = [], iter(outcomes)
    for _ in range(rounds):
        [drafting] = backoff.drafting([rid])
        if drafting:
            report = next(it, NOTHING)
            backoff.observe([rid], [True], [report.committed], report, plain_seconds)
        out.append("D" if drafting else ".")
    return "".join(out)


def test_backs_off_exponentially_and_caps():
    assert pattern(DraftBackoff(max_period=4), [], 20) == "D.D.D...D...D...D..."


def test_a_dearer_draft_probes_less_often():
    """A draft that costs two plain rounds and verifies nothing: the longest period doubles (probes
    cost the same share of the time), where a cheap one stays at max_period."""
    dear, cheap = round_report((0,), 1, 0.3, draft_seconds=0.2), round_report((0,), 1, 0.15, draft_seconds=0.05)
    assert pattern(DraftBackoff(max_period=4), [dear] * 9, 40, plain_seconds=0.1) == (
        "D.D.D...D.......D.......D.......D.......")
    assert pattern(DraftBackoff(max_period=4), [cheap] * 9, 20, plain_seconds=0.1) == "D.D.D...D...D...D..."


def test_a_verified_draft_resets_the_backoff():
    assert pattern(DraftBackoff(), [NOTHING, NOTHING, SOMETHING, NOTHING], 10) == "D.D.DDD.D."


def test_verified_but_slower_than_plain_decoding_backs_off():
    # One request, plain step 0.1 s. A round of 0.2 s committing 2 tokens only breaks even; 1 token loses.
    slow, fast = round_report((3,), 1, 0.2), round_report((3,), 4, 0.2)
    assert pattern(DraftBackoff(), [slow, slow, fast, fast], 8, plain_seconds=0.1) == "D.D.DDD."
    # Without a profile the same rounds count as paid: they verified something.
    assert pattern(DraftBackoff(), [slow, slow, fast, fast], 4) == "DDDD"


def test_speed_is_smoothed_over_rounds():
    b = DraftBackoff()
    fast, unlucky = round_report((3,), 3, 0.2), round_report((3,), 1, 0.2)   # 1.5x and 0.5x plain decoding
    assert pattern(b, [fast, fast, fast, unlucky], 4, plain_seconds=0.1) == "DDDD"
    assert pattern(b, [unlucky], 2, plain_seconds=0.1) == "D."   # a second one: below 1 on average


def test_each_request_pays_for_its_own_drafts():
    """Two requests share a round: plain step 0.1 s, draft 0.05 s (split evenly), verification 0.05 s
    beyond a plain step (split 3:1 by verified drafts). a commits 4 tokens on a share of 0.1125 s
    (1.8x plain decoding's 0.05 s per token); b commits 1 on 0.0875 s (0.57x): only b backs off."""
    b = DraftBackoff()
    assert b.drafting(["a", "b"]) == [True, True]
    report = round_report((3, 1), 5, 0.2, draft_seconds=0.05)
    b.observe(["a", "b"], [True, True], [4, 1], report, plain_seconds=0.1)
    assert b.drafting(["a", "b"]) == [True, False]
    # A round that drafted for a only says nothing about b.
    b.observe(["a", "b"], [True, False], [4, 1], round_report((3, 0), 5, 0.2, draft_seconds=0.05, drafted=1), 0.1)
    assert b.drafting(["a", "b"]) == [True, True]


def test_a_round_without_drafts_changes_nothing():
    b = DraftBackoff()
    b.drafting(["a"])
    b.observe(["a"], [False], [1], round_report((0,), 1, 0.1, drafted=0), plain_seconds=0.1)
    assert b.requests["a"].period == 1 and b.requests["a"].speed_ratio == 1.0


def test_backed_off_requests_probe_in_the_same_rounds():
    """Requests at the same period share the probe rounds (one draft forward for all of them), a
    newcomer included: it starts at the running requests' period."""
    b = DraftBackoff()
    assert pattern(b, [], 6, rid="a") == "D.D.D."     # a now drafts every 8th round
    assert b.requests["a"].period == 8
    rounds = []
    for _ in range(18):                                # rounds 6..23; b joins at round 6
        ids = ["a", "b"]
        drafting = b.drafting(ids)
        rounds.append("".join("D" if d else "." for d in drafting))
        b.observe(ids, drafting, [1, 1], round_report((0, 0), 2, 0.2, drafted=sum(drafting)), None)
    assert [i + 6 for i, r in enumerate(rounds) if r != ".."] == [8, 16]
    assert rounds[2] == rounds[10] == "DD"
    assert b.requests["a"].period == b.requests["b"].period == 32


def test_the_periods_of_requests_that_left_still_count():
    """One user at a time: each new request starts where the last ones ended, not afresh."""
    b = DraftBackoff()
    assert pattern(b, [], 5, rid="a") == "D.D.D"       # period 8
    b.release("a")
    assert pattern(b, [], 4, rid="b") == "...D"        # rounds 5..8: probes at 8 with period 8
    b = DraftBackoff()
    assert pattern(b, [SOMETHING, SOMETHING], 2, rid="a") == "DD"
    b.release("a")
    assert pattern(b, [SOMETHING], 1, rid="b") == "D"  # after requests whose drafts paid: at once
