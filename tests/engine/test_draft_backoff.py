"""Draft backoff: skip 1, 2, 4... rounds after drafted rounds that did not pay (verified nothing, or
committed tokens more slowly than plain decoding would have); reset when one pays."""

from engine.api import RoundReport
from engine.draft_backoff import DraftBackoff


def round_report(batch: int, verified: int, committed: int, seconds: float) -> RoundReport:
    return RoundReport(batch_size=batch, verify_tokens=batch + verified, budgets=(verified,) + (0,) * (batch - 1),
                       expected_accepted=0.0, accepted=committed - batch, committed=committed, draft_seconds=0.0,
                       schedule_seconds=0.0, verify_seconds=seconds, round_seconds=seconds)


def pattern(backoff: DraftBackoff, outcomes: list[RoundReport], rounds: int, plain_seconds: float | None = None) -> str:
    out, it = [], iter(outcomes)
    for _ in range(rounds):
        if backoff.should_draft():
            out.append("D")
            backoff.observe(next(it, round_report(2, 0, 2, 0.2)), plain_seconds)
        else:
            out.append(".")
    return "".join(out)


NOTHING, SOMETHING = round_report(2, 0, 2, 0.2), round_report(1, 3, 2, 0.2)


def test_backs_off_exponentially_and_caps():
    assert pattern(DraftBackoff(max_skip=4), [], 20) == "D.D..D....D....D...."


def test_a_verified_draft_resets_the_backoff():
    assert pattern(DraftBackoff(), [NOTHING, NOTHING, SOMETHING, NOTHING], 10) == "D.D..DD.D."


def test_verified_but_slower_than_plain_decoding_backs_off():
    # One request, plain step 0.1 s. A round of 0.2 s committing 2 tokens only breaks even; 1 token loses.
    slow, fast = round_report(1, 3, 1, 0.2), round_report(1, 3, 4, 0.2)
    assert pattern(DraftBackoff(), [slow, slow, fast, fast], 8, plain_seconds=0.1) == "D.D..DDD"
    # Without a profile the same rounds count as paid: they verified something.
    assert pattern(DraftBackoff(), [slow, slow, fast, fast], 4) == "DDDD"


def test_speed_is_smoothed_over_rounds():
    b = DraftBackoff()
    for _ in range(3):
        b.observe(round_report(4, 8, 12, 0.2), plain_seconds=0.1)   # 1.5x plain decoding
    b.observe(round_report(4, 8, 4, 0.2), plain_seconds=0.1)        # one unlucky round: 0.5x
    assert b.should_draft() and b.next_skip == 1
    b.observe(round_report(4, 8, 4, 0.2), plain_seconds=0.1)        # a second one: below 1 on average
    assert not b.should_draft()
