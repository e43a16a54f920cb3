"""`dspark-node receipts list|show|verify|export|verify-proof`: read the node's billing ledger.

The ledger is opened read-only, so these are safe while the daemon runs (they read a consistent
WAL snapshot). Exit status: 0 ok, 1 the ledger or proof does not verify, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from contextlib import closing, contextmanager
from typing import Callable, Iterator, TextIO

from node.billing import (BillingError, UnverifiedReceipt, check_proof, iso_time, load_period, parse_time_ms,
                          period_proof, receipt_record, verified_receipt, write_export)
from node.config import DEFAULT_DATA_DIR
from node.identity import IdentityError, peer_id_from_public_key, public_key_from_peer_id
from node.ledger import LEDGER_FILE, DamagedRow, Ledger, LedgerError, unreadable
from node.ledger_audit import audit_ledger
from node.gateway.receipt_audit import audit_store
from node.gateway.receipt_store import STORE_FILE, ReceiptStore


class _UsageError(ValueError):
    pass


def _hex(text: str, what: str, size: int | None = None) -> bytes:
    if not text:
        raise _UsageError(f"{what} is empty")
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise _UsageError(f"{what} {text!r} is not hexadecimal") from None
    if size is not None and len(value) != size:
        raise _UsageError(f"{what} must be {size} bytes ({2 * size} hex digits), got {len(value)}")
    return value


def _client(args: argparse.Namespace) -> bytes | None:
    # `is not None`: an empty --client (an unset variable) is refused, not taken as every client.
    return _hex(args.client, "--client", 32) if args.client is not None else None


def _time(text: str | None) -> int | None:
    try:
        return parse_time_ms(text) if text is not None else None
    except BillingError as exc:
        raise _UsageError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("receipts", help="list, show, verify and export the node's signed receipts")
    sub = parser.add_subparsers(dest="receipts_command", metavar="ACTION", required=True)
    ledger_args = argparse.ArgumentParser(add_help=False)
    # Expanded as `run` expands its data_dir: `--data-dir=~/x` reaches us with the ~ unexpanded.
    ledger_args.add_argument("--data-dir", type=lambda text: Path(text).expanduser(),
                             default=os.environ.get("DSPARK_DATA_DIR") or str(DEFAULT_DATA_DIR),
                             help=f"the node's data directory, holding {LEDGER_FILE} (default: %(default)s)")

    p = sub.add_parser("list", parents=[ledger_args], help="the newest receipts, one line each")
    p.add_argument("--limit", type=int, default=20, help="how many (default: %(default)s)")
    p.add_argument("--client", help="only this client's receipts (public key hex)")
    p.set_defaults(func=_run(_list))

    p = sub.add_parser("show", parents=[ledger_args], help="one receipt in full, as JSON")
    p.add_argument("job_id", help="job id (hex)")
    p.add_argument("--client", help="the client's public key (hex), if several clients used this job id")
    p.set_defaults(func=_run(_show))

    p = sub.add_parser("verify", parents=[ledger_args],
                       help="check every signature, the hash chain and the sequence; names the first bad row")
    p.add_argument("--peer-id", help="check against this worker peer ID instead of the ledger's own key")
    p.set_defaults(func=_run(_verify))

    p = sub.add_parser("export", parents=[ledger_args],
                       help="a period's receipts (JSON lines or CSV) with totals per client and a Merkle root")
    p.add_argument("--since", help="start of the period, inclusive (ISO 8601 date/time in UTC, or unix ms)")
    p.add_argument("--until", help="end of the period, exclusive")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="(default: %(default)s)")
    p.add_argument("--output", type=Path, help="write here (atomically) instead of standard output")
    p.add_argument("--proof", metavar="JOB_ID", help="print the inclusion proof of this job's receipt instead")
    p.add_argument("--client", help="with --proof: the client's public key (hex)")
    p.set_defaults(func=_run(_export))

    p = sub.add_parser("verify-proof", help="check an inclusion proof written by `export --proof`")
    p.add_argument("proof", type=Path, help="the proof JSON file ('-' for standard input)")
    p.add_argument("--root", help="required: the period's published Merkle root (hex); the root inside the "
                                  "proof is the prover's own claim")
    p.add_argument("--peer-id", help="require the receipt to be signed by this worker (default: by the worker "
                                     "it names)")
    p.set_defaults(func=_run(_verify_proof))


def _run(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except UnverifiedReceipt as exc:
            print(f"receipts {args.receipts_command}: FAILED: {exc}", file=sys.stderr)
            return 1
        except DamagedRow as exc:       # before LedgerError, its base: damage is 'does not verify', not usage
            print(f"receipts {args.receipts_command}: FAILED: {exc}; the ledger is damaged and does not verify",
                  file=sys.stderr)
            return 1
        except sqlite3.Error as exc:
            # The file opened as a ledger (its meta table names a node key), but a table or a value
            # is not what the node writes: a dropped table, TEXT where a BLOB belongs.
            print(f"receipts {args.receipts_command}: FAILED: {unreadable(exc)}; it is damaged and does not verify",
                  file=sys.stderr)
            return 1
        except (_UsageError, LedgerError, BillingError, OSError) as exc:
            print(f"receipts {args.receipts_command}: {exc}", file=sys.stderr)
            return 2
    return run


def _open(args: argparse.Namespace) -> closing[Ledger | ReceiptStore]:
    """The node's ledger; or, in a gateway's data dir, the gateway's store of the receipts workers
    signed for it (node/gateway/receipt_store.py: list, show and verify read it the same way)."""
    if not (args.data_dir / LEDGER_FILE).exists() and (args.data_dir / STORE_FILE).exists():
        return closing(ReceiptStore.open_readonly(args.data_dir / STORE_FILE))
    return closing(Ledger.open_readonly(args.data_dir / LEDGER_FILE))


def _list(args: argparse.Namespace) -> int:
    client = _client(args)
    if not 1 <= args.limit < 2**63:       # SQLite integers are signed 64-bit
        raise _UsageError(f"--limit must be from 1 to 2^63-1, got {args.limit}")
    with _open(args) as ledger:
        rows = ledger.latest(args.limit, client)
    print(f"{'SEQ':>7}  {'ISSUED (UTC)':<19}  {'CLIENT':<12}  {'JOB':<32}  {'OUTCOME':<9}  {'TOKENS':>7}  "
          f"{'AMOUNT':>10}  ACK")
    for row in rows:
        issued = iso_time(row.issued_at_ms)[:19].replace("T", " ")
        print(f"{row.sequence:>7}  {issued:<19}  {row.client_key.hex()[:12]}  {row.job_id.hex():<32}  "
              f"{row.outcome:<9}  {row.output_tokens:>7}  {row.amount_micros:>10}  "
              f"{'yes' if row.ack_bytes else 'no'}")
    return 0


def _show(args: argparse.Namespace) -> int:
    job_id = _hex(args.job_id, "job id")
    client = _client(args)
    with _open(args) as ledger:
        rows = ledger.find(job_id, client)
        if not rows:
            raise _UsageError(f"no receipt for job {job_id.hex()}")
        if len(rows) > 1:
            raise _UsageError(f"job id {job_id.hex()} was used by {len(rows)} clients; pass --client")
        # A node's receipt is checked as verify checks it: what an operator reads to answer a dispute
        # must not be a bill the worker never signed. (A gateway's store holds many workers' receipts,
        # shown as stored; `verify` audits them.)
        receipt = verified_receipt(ledger, rows[0]) if isinstance(ledger, Ledger) else rows[0].receipt()
    print(json.dumps(receipt_record(rows[0], receipt), indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        # `is not None`: an empty --peer-id (an unset variable) is refused, not taken as none given.
        key = public_key_from_peer_id(args.peer_id) if args.peer_id is not None else None
    except IdentityError as exc:
        raise _UsageError(str(exc)) from None
    with _open(args) as ledger:
        if isinstance(ledger, ReceiptStore):
            if key is not None:
                raise _UsageError("--peer-id applies to a node's ledger; a gateway's store holds many "
                                  "workers' receipts")
            report = audit_store(ledger)
        elif key is not None and key != ledger.worker_public_key:
            # Every row would fail its signature check, one line each, hiding the one cause.
            print(f"FAILED: this ledger belongs to {_owner(ledger.worker_public_key)} (the key it stores), not "
                  f"to {args.peer_id}, so no receipt in it is signed by {args.peer_id}", file=sys.stderr)
            return 1
        else:
            report = audit_ledger(ledger, key)
    if report.ok:
        print(f"ok: {report.checked} receipts, chain head {report.head_digest.hex()}, "
              f"{report.amount_micros} micros billed, {report.acknowledged} acknowledged")
        return 0
    print(f"FAILED: first bad row: {report.problems[0]}", file=sys.stderr)
    for problem in report.problems[1:]:
        print(f"  also: {problem}", file=sys.stderr)
    print(f"{report.checked} receipts checked, {len(report.problems)} problems", file=sys.stderr)
    return 1


def _owner(stored_key: bytes) -> str:
    try:
        return f"peer ID {peer_id_from_public_key(stored_key)}"
    except (IdentityError, TypeError):      # a meta table edited to a key of another size, or to TEXT
        return "a key that is not an Ed25519 public key (the ledger's meta table is damaged)"


def _export(args: argparse.Namespace) -> int:
    since, until = _time(args.since), _time(args.until)
    proof_job = _hex(args.proof, "--proof job id") if args.proof is not None else None
    client = _client(args)
    if args.output is not None and args.output.resolve().is_relative_to(args.data_dir.resolve()):
        # The rename would replace whatever is there: `--output` naming the ledger or the key lost them.
        raise _UsageError(f"--output {args.output} is inside the data dir {args.data_dir}, beside the ledger and "
                          "the node key; write the export elsewhere")
    summary = None
    with _open(args) as ledger, _output(args.output) as out:
        if isinstance(ledger, ReceiptStore):
            raise _UsageError(f"{args.data_dir} holds a gateway's receipt store: export reads a node's ledger "
                              "(list, show and verify work here)")
        period = load_period(ledger, since, until)
        if proof_job is not None:
            out.write(json.dumps(period_proof(period, proof_job, client), indent=2) + "\n")
        else:
            summary = write_export(period, args.format, out)
    if summary is not None:     # said once the export is in place, not before a rename that may fail
        print(f"{summary['receipts']} receipts, {summary['amount_micros']} micros, "
              f"merkle root {summary['merkle_root']}", file=sys.stderr)
    return 0


def _verify_proof(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if str(args.proof) == "-" else args.proof.read_text()
    except UnicodeDecodeError:
        raise _UsageError(f"{args.proof} is not JSON (not UTF-8 text)") from None
    try:
        proof = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _UsageError(f"{args.proof} is not JSON: {exc}") from None
    except RecursionError:
        raise _UsageError(f"{args.proof} is not JSON: arrays or objects nested too deeply") from None
    except ValueError as exc:
        # An integer of more digits than Python converts; its advice (raise the limit) is not the reader's.
        raise _UsageError(f"{args.proof} is not JSON: {str(exc).partition(';')[0]}") from None
    if not isinstance(proof, dict):
        raise _UsageError(f"{args.proof} is not a proof object")
    if args.root is None:
        # A proof checked only against the root it carries proves nothing: a forger computes a
        # root to match. What a dispute needs is inclusion under the root the worker published.
        raise _UsageError("--root is required: pass the period's published Merkle root (the root inside "
                          "the proof is the prover's own claim)")
    root = _hex(args.root, "--root", 32)
    try:
        receipt = check_proof(proof, root, args.peer_id)
    except BillingError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"ok: receipt {proof['receipt_digest']} (job {receipt.job_id.hex()}, sequence {receipt.sequence}, "
          f"{receipt.amount_micros} micros, signed by {receipt.worker_peer_id}) is leaf {proof['leaf_index']} "
          f"of {proof['tree_size']} under root {proof['merkle_root']}")
    return 0


@contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    """Standard output, or a file written under a temporary name and renamed when complete, so an
    interrupted export never leaves a truncated bill behind."""
    if path is None:
        # Spooled to disk, then copied: a refusal midway (a receipt that does not verify) must not
        # leave the records before it on standard output, where they read as a whole bill.
        with tempfile.TemporaryFile("w+", newline="") as spool:
            yield spool
            spool.seek(0)
            shutil.copyfileobj(spool, sys.stdout)
        return
    try:
        with atomic_file(path) as out:
            yield out
    except OSError as exc:
        raise _unwritable(path, exc) from None


@contextmanager
def atomic_file(path: Path) -> Iterator[TextIO]:
    """`path` written under a temporary name beside it and renamed over it when complete (also for
    `submit --receipt-out`). OSError as raised: the directory refuses the file, a write or the rename fails."""
    tmp = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False, newline="")
    try:
        with tmp:
            yield tmp
        os.replace(tmp.name, path)
    except BaseException:     # a refusal midway, or a write or rename that failed: no file left behind
        os.unlink(tmp.name)
        raise


def _unwritable(path: Path, exc: OSError) -> _UsageError:
    return _UsageError(f"--output {path}: cannot write there ({exc.strerror})")
