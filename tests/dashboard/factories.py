"""Event builders shared by the dashboard tests: realistic stats and round reports."""

from __future__ import annotations

from dataclasses import dataclass

from engine.api import CorpusFill, DraftCounts, EngineInfo, RequestStats, RoundReport
from node.events import EngineRound, JobFinished

GIB = 2**30


@dataclass
class EngineState:
    """The engine attributes metrics and the dashboard read (node.metrics.EngineView), as plain values."""
    info: EngineInfo
    free_slots: int = 8
    queue_depth: int = 0
    active: int = 0
    corpus_fill: CorpusFill | None = None


def engine_info(device: str = "cpu") -> EngineInfo:
    return EngineInfo(model_id="smollm2-135m-instruct", model_digest=bytes(range(32)), method="ngram",
                      drafter_id="ngram", drafter_digest=b"", device=device, dtype="float32",
                      max_context=4096, max_batch=8, block_size=4)


def stats(output_tokens: int, rounds: int, reached: list[int], accepted_at: list[int],
          prompt_tokens: int = 12, busy_seconds: float = 2.0, corpus: DraftCounts | None = None) -> RequestStats:
    """`corpus`: the part of the drafts found in other requests' text; the model drafted the rest."""
    totals = DraftCounts(drafted=sum(reached) + rounds, verified=sum(reached), accepted=sum(accepted_at))
    by_source = {"drafter": totals}
    if corpus is not None:
        by_source = {"corpus": corpus, "drafter": DraftCounts(totals.drafted - corpus.drafted,
                                                              totals.verified - corpus.verified,
                                                              totals.accepted - corpus.accepted)}
    return RequestStats(prompt_tokens=prompt_tokens, output_tokens=output_tokens, rounds=rounds,
                        drafted_tokens=totals.drafted, verified_tokens=totals.verified,
                        accepted_tokens=totals.accepted, by_source=by_source, queue_seconds=0.01,
                        prefill_seconds=busy_seconds / 4, decode_seconds=busy_seconds * 3 / 4,
                        device_seconds=busy_seconds, reached=reached,
                        accepted_at=accepted_at)


def finished(job_id: str, outcome: str, s: RequestStats, amount: int, sequence: int, client: str = "ab" * 32,
             ttft: float | None = 0.3, at: float | None = None) -> JobFinished:
    extra = {"at": at} if at is not None else {}
    return JobFinished(job_id=job_id, client=client, outcome=outcome, stats=s, amount_micros=amount,
                       receipt_sequence=sequence, time_to_first_token=ttft, **extra)


def engine_round(budgets: tuple[int, ...], accepted: int, seconds: float, at: float | None = None,
                 drafted: int | None = None) -> EngineRound:
    drafted = len(budgets) if drafted is None else drafted
    report = RoundReport(batch_size=len(budgets), drafted=drafted, verify_tokens=len(budgets) + sum(budgets),
                         budgets=budgets,
                         expected_accepted=accepted + 0.5, accepted=accepted, committed=accepted + len(budgets),
                         draft_seconds=seconds / 4, schedule_seconds=seconds / 20, verify_seconds=seconds / 2,
                         round_seconds=seconds)
    return EngineRound(report=report, **({"at": at} if at is not None else {}))
