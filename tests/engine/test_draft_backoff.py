"""Draft backoff: skip 1, 2, 4... rounds after rounds that verified nothing; reset on success."""

from engine.draft_backoff import DraftBackoff


def pattern(backoff: DraftBackoff, verified: list[bool], rounds: int) -> str:
    out, outcomes = [], iter(verified)
    for _ in range(rounds):
        if backoff.should_draft():
            out.append("D")
            backoff.observe((1,) if next(outcomes, False) else (0, 0))
        else:
            out.append(".")
    return "".join(out)


def test_backs_off_exponentially_and_caps():
    assert pattern(DraftBackoff(max_skip=4), [], 20) == "D.D..D....D....D...."


def test_a_verified_draft_resets_the_backoff():
    assert pattern(DraftBackoff(), [False, False, True, False], 10) == "D.D..DD.D."
