"""`dspark-node submit`: sign a job, stream its text to stdout, verify the receipt, countersign it
(an Acknowledgment, docs/receipts.md) and keep a copy (--receipt-out)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc

from dspark.v1.envelope_pb2 import Envelope
from engine.api import SEED_LIMIT
from node import keepalive
from node.billing import receipt_record
from node.client import MAX_JOB_TIMEOUT_S, ClientError, JobRefused, JobResult, WorkerClient, idle_timeout_problem
from node.commands import submit_network
from node.commands.keys import DEFAULT_CLIENT_KEY
from node.commands.receipts import atomic_file
from node.commands.terminal import answer_printer
from node.envelope import digest
from node.identity import Identity, IdentityError
from node.ledger import ReceiptRow
from node.p2p.discovery import DiscoveryError
from node.p2p.failover import NoWorkerError
from node.receipts import acknowledgment


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("submit", help="send a signed job to a worker and stream the answer")
    parser.add_argument("--node", metavar="HOST:PORT",
                        help="the worker's gRPC endpoint (omit to find one on the peer network: --model, --bootstrap)")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the user message (chat template applied)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, metavar="S", help="makes a sampled job reproducible on one worker")
    parser.add_argument("--max-price", type=int, metavar="MICROS",
                        help="refuse to pay more per million output tokens (default: the advertised price)")
    parser.add_argument("--max-price-gpu-second", type=int, metavar="MICROS",
                        help="refuse to pay more per GPU-second (default: the advertised price; 0 agrees to no "
                             "time charge)")
    parser.add_argument("--key", type=Path, default=DEFAULT_CLIENT_KEY, metavar="FILE",
                        help="client key (created if missing; default: %(default)s)")
    parser.add_argument("--peer-id", metavar="PEER_ID",
                        help="the worker's expected peer ID (default: trust its advert)")
    parser.add_argument("--tls", default="auto", choices=["auto", "on", "off"],
                        help="auto: TLS unless the node is on loopback (default)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="deadline for the job (default: %(default)g)")
    parser.add_argument("--idle-timeout", type=float, default=keepalive.IDLE_TIMEOUT_S, metavar="SECONDS",
                        help="give up on a worker that sends nothing, not even a progress event, for this long "
                             f"(more than {keepalive.HEARTBEAT_S:g}; default: %(default)g)")
    parser.add_argument("--no-acknowledge", dest="acknowledge", action="store_false",
                        help="do not countersign the verified receipt (by default the worker is sent the client's "
                             "acknowledgment, so its ledger shows the bill as accepted)")
    parser.add_argument("--receipt-out", type=lambda text: Path(text).expanduser(), metavar="FILE",
                        help="write the verified receipt and the acknowledgment to FILE (JSON: the fields of "
                             "`receipts show`, with the envelopes in base64)")
    submit_network.add_arguments(parser)
    parser.set_defaults(func=run)


def _fail(message: str, code: int = 1) -> int:
    print(f"dspark-node submit: {message}", file=sys.stderr)
    return code


@dataclass
class ReceiptKeeper:
    """What submit does with a verified receipt, on either path (--node, or the peer network):
    `countersign` while the worker's connection is open, then `report` once the answer and the
    receipt line are printed."""
    acknowledge: bool
    out: Path | None
    key: Path
    ack: Envelope | None = None
    refusal: str = ""

    async def countersign(self, client: WorkerClient, result: JobResult) -> None:
        # A job the worker ended early is not an answer: its bill is kept (--receipt-out) but not
        # accepted. (The peer network gives no such result: it tries the next worker.)
        if not self.acknowledge or not result.finished:
            return
        ack = acknowledgment(client.identity, result.receipt_envelope)
        try:
            await client.acknowledge(result.receipt_envelope, ack=ack)
        except (JobRefused, ClientError) as exc:
            self.refusal = str(exc)
        else:
            self.ack = ack

    def report(self, result: JobResult) -> int:
        """Say what was done with the receipt; the exit status it calls for."""
        sequence = result.receipt.sequence
        if self.ack is not None:
            print(f"receipt #{sequence} acknowledged (countersigned with the client key {self.key})", file=sys.stderr)
        elif self.refusal:
            # Exit 0 all the same: the answer and its verified receipt stand, and the acknowledgment
            # only adds the client's signature to the worker's copy. A script that retried on a
            # non-zero status would run, and pay for, the job again.
            print(f"dspark-node submit: warning: the worker did not take the acknowledgment of receipt "
                  f"#{sequence} ({self.refusal}); its ledger shows the bill as not acknowledged", file=sys.stderr)
        if self.out is None:
            return 0
        try:
            with atomic_file(self.out) as out:
                json.dump(self._record(result), out, indent=2)
                out.write("\n")
        except OSError as exc:
            # Asked for and not written: the receipt stays in the worker's ledger (WorkerClient.get_receipt).
            return _fail(f"--receipt-out {self.out}: cannot write the receipt there ({exc.strerror})")
        print(f"receipt #{sequence} written to {self.out}", file=sys.stderr)
        return 0

    def _record(self, result: JobResult) -> dict[str, object]:
        """`receipts show`'s record of the receipt (with the worker's envelope, for re-verifying), and
        the acknowledgment envelope the worker took (null when none)."""
        envelope = result.receipt_envelope.SerializeToString(deterministic=True)
        ack = self.ack.SerializeToString(deterministic=True) if self.ack is not None else None
        r = result.receipt
        row = ReceiptRow(r.sequence, r.client_public_key, r.job_id, digest(result.receipt_envelope), r.issued_at_ms,
                         r.outcome, r.output_tokens, r.amount_micros, envelope, ack)
        return {**receipt_record(row, r), "acknowledgment": base64.b64encode(ack).decode() if ack is not None else None}


async def _submit(args: argparse.Namespace, identity: Identity, keeper: ReceiptKeeper) -> int:
    try:
        client = await WorkerClient.connect(args.node, identity, peer_id=args.peer_id, tls=args.tls)
    except ClientError as exc:
        return _fail(str(exc))
    async with client:
        prompt = {"text": args.prompt} if args.raw else {"chat": [{"role": "user", "content": args.prompt}]}
        job = client.sign_job(**prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              seed=args.seed, max_price_per_mtok_micros=args.max_price,
                              max_price_per_gpu_second_micros=args.max_price_gpu_second)
        try:
            result = await client.run(job, on_text=answer_printer(), timeout_s=args.timeout,
                                      idle_timeout_s=args.idle_timeout)
        except JobRefused as exc:
            if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return _fail(f"no result within --timeout {args.timeout:g} s; the worker stops the job and its "
                             "receipt bills what was produced")
            return _fail(f"refused: {exc}")
        except ClientError as exc:
            return _fail(str(exc))
        await keeper.countersign(client, result)
    print()
    receipt = result.receipt
    print(f"[{result.finish_reason}] {receipt.output_tokens} tokens, {receipt.tokens_per_second:.1f} tok/s, "
          f"amount {receipt.amount_micros} micros, receipt #{receipt.sequence} verified "
          f"(worker {client.peer_id})", file=sys.stderr)
    code = keeper.report(result)
    if not result.finished:
        return _fail(f"the worker ended the job early ({result.finish_reason}); its receipt bills what it produced")
    return code


def _bad_argument(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, checked before any key is made or peer dialled."""
    if not 1 <= args.max_new_tokens < 2**32:      # the job's field is uint32
        return f"--max-new-tokens must be from 1 to 2^32-1, got {args.max_new_tokens}"
    if not 0 <= args.temperature <= 100:      # also refuses nan
        return f"--temperature must be from 0 to 100, got {args.temperature}"
    if args.seed is not None and not 0 <= args.seed < SEED_LIMIT:
        return f"--seed must be from 0 to 2^63-1, got {args.seed}"
    for flag, value in (("--max-price", args.max_price), ("--max-price-gpu-second", args.max_price_gpu_second)):
        if value is not None and not 0 <= value < 2**64:     # the job's caps are uint64
            return f"{flag} must be from 0 to 2^64-1 micro-units, got {value}"
    if args.attempts < 1:
        return "--attempts must be at least 1"
    if not 0 < args.timeout <= MAX_JOB_TIMEOUT_S:     # also refuses nan and inf
        return f"--timeout must be a positive number of seconds up to {MAX_JOB_TIMEOUT_S:g}, got {args.timeout}"
    problem = idle_timeout_problem(args.idle_timeout)
    if problem:
        return f"--idle-timeout {problem}"
    if args.receipt_out is not None:
        problem = _unwritable(args.receipt_out)
        if problem:
            return f"--receipt-out {args.receipt_out}: {problem}"
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        return "--prompt is not valid UTF-8 text (check the terminal's or the file's encoding)"
    return submit_network.missing_flag(args) if args.node is None else None


def _unwritable(path: Path) -> str | None:
    """Why no file can be written at `path`, found before the job is paid for. A file made and
    dropped in its directory, not os.access: root passes that on a read-only directory."""
    if path.is_dir():
        return "is a directory"
    try:
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as exc:
        return f"cannot write there ({exc.strerror})"
    return None


def run(args: argparse.Namespace) -> int:
    problem = _bad_argument(args)
    if problem:
        return _fail(problem, 2)     # a usage error, as argparse and the other commands exit
    path = args.key.expanduser()
    try:
        if not path.exists():
            print(f"dspark-node submit: creating client key {path}", file=sys.stderr)
        identity = Identity.load_or_create(path)
    except IdentityError as exc:
        return _fail(str(exc))
    keeper = ReceiptKeeper(args.acknowledge, args.receipt_out, path)
    if args.node is None:
        try:
            return submit_network.run(args, identity, keeper)
        except (DiscoveryError, NoWorkerError) as exc:
            return _fail(str(exc))
    return asyncio.run(_submit(args, identity, keeper))
