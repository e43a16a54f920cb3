"""Child process for the crash test: bills jobs in a loop, as the gRPC service does, until killed.

Usage: ledger_writer.py LEDGER_PATH FIRST_JOB. Keeps two jobs admitted ahead of the one it
finishes (so a kill finds jobs 'running'), and prints each job number once its receipt committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from receipts_helpers import CLIENT, WORKER, job_digest, job_id, outcome

from node.ledger import Ledger


def main(path: Path, first: int) -> None:
    ledger = Ledger.open(path, WORKER)
    ledger.recover()   # what the daemon does at start
    n = first
    for ahead in range(first, first + 2):
        ledger.register_job(CLIENT.public_key, job_id(ahead), job_digest(CLIENT, ahead), 0)
    while True:
        ledger.register_job(CLIENT.public_key, job_id(n + 2), job_digest(CLIENT, n + 2), 0)
        ledger.finish_job(outcome(n, output_ids=tuple(range(n % 50))))
        print(n, flush=True)
        n += 1


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
