"""Ledger figures for docs/receipts.md: per-job cost of signing + appending a receipt (median, p99),
sustained appends per second, and `receipts verify` time for a large ledger.

    .venv/bin/python scripts/bench_ledger.py [--jobs 2000] [--verify-size 100000]

Runs in a temp dir. The durable figures use the ledger as the node does (WAL, synchronous=FULL,
one transaction per receipt). The large ledger for the verify timing is built with synchronous=OFF
(building 100k receipts with an fsync each would take minutes and measure the disk, not verify).
Not run in CI: the 100k build and verify take about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

from engine.api import RequestStats
from node.identity import Identity
from node.ledger import Ledger
from node.ledger_audit import audit_ledger
from node.receipts import JobOutcome, build_receipt, sign_receipt

WORKER = Identity.from_seed(hashlib.sha256(b"bench worker").digest())
CLIENTS = [Identity.from_seed(hashlib.sha256(b"bench client %d" % i).digest()) for i in range(8)]


def outcome(n: int) -> JobOutcome:
    client = CLIENTS[n % len(CLIENTS)]
    job_id = n.to_bytes(16, "big")
    return JobOutcome(
        job_id=job_id, client_key=client.public_key, job_digest=hashlib.sha256(job_id).digest(),
        model="smollm2-135m-instruct", model_digest=bytes(32), drafter="ngram", drafter_digest=b"",
        outcome="completed", stats=RequestStats(prompt_tokens=40, output_tokens=128, rounds=60, drafted_tokens=240,
                                                verified_tokens=240, accepted_tokens=68, prefill_seconds=0.05,
                                                decode_seconds=2.0, device_seconds=2.05),
        output_ids=tuple(range(128)), device="cpu", price_per_mtok_micros=250_000, price_per_gpu_second_micros=0)


def bill_one(ledger: Ledger, n: int) -> tuple[float, float]:
    """What the service does per job: register it (replay cache), then finish it (sign + append).
    Returns the seconds each took."""
    job = outcome(n)
    start = time.perf_counter()
    ledger.register_job(job.client_key, job.job_id, job.job_digest, 0)
    registered = time.perf_counter()
    ledger.finish_job(job)
    return registered - start, time.perf_counter() - registered


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def durable_figures(directory: Path, jobs: int) -> None:
    ledger = Ledger.open(directory / "durable.sqlite3", WORKER)
    start = time.perf_counter()
    register, finish = zip(*(bill_one(ledger, n) for n in range(jobs)))
    elapsed = time.perf_counter() - start
    ledger.close()
    for name, costs in (("register_job (replay cache)", register), ("finish_job (sign + append)", finish)):
        print(f"{name}: median {statistics.median(costs) * 1e3:.2f} ms, p99 {percentile(costs, 0.99) * 1e3:.2f} ms")
    print(f"sustained: {jobs / elapsed:.0f} jobs/s registered and receipted ({jobs} jobs, synchronous=FULL)")


def signing_figure(count: int = 2000) -> None:
    """The CPU part of finish_job alone: build + sign a receipt (the rest is SQLite and fsync)."""
    costs = []
    for n in range(count):
        start = time.perf_counter()
        sign_receipt(WORKER, build_receipt(outcome(n), WORKER.peer_id, n + 1, bytes(32), 0))
        costs.append(time.perf_counter() - start)
    print(f"build + sign one receipt: median {statistics.median(costs) * 1e6:.0f} us, "
          f"p99 {percentile(costs, 0.99) * 1e6:.0f} us")


def verify_figure(directory: Path, size: int) -> None:
    path = directory / "large.sqlite3"
    ledger = Ledger.open(path, WORKER)
    ledger._conn.execute("PRAGMA synchronous=OFF")   # build speed only; see the module docstring
    start = time.perf_counter()
    for n in range(size):
        bill_one(ledger, n)
    print(f"built {size} receipts in {time.perf_counter() - start:.1f} s (synchronous=OFF); "
          f"file {path.stat().st_size / 2**20:.1f} MiB")
    ledger.close()
    reader = Ledger.open_readonly(path)
    start = time.perf_counter()
    report = audit_ledger(reader)
    elapsed = time.perf_counter() - start
    reader.close()
    if not report.ok:
        sys.exit(f"verify failed: {report.problems[0]}")
    print(f"verify {report.checked} receipts: {elapsed:.1f} s ({report.checked / elapsed:.0f} receipts/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="durable appends to time")
    parser.add_argument("--verify-size", type=int, default=100_000, help="receipts in the ledger to verify")
    args = parser.parse_args()
    signing_figure()
    with tempfile.TemporaryDirectory() as tmp:
        durable_figures(Path(tmp), args.jobs)
        verify_figure(Path(tmp), args.verify_size)


if __name__ == "__main__":
    main()
