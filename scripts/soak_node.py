"""Soak a real node: clients submit, cancel, close, time out, replay and acknowledge jobs at random
for a while, then check what billing relies on once the node has stopped: every accepted job has
exactly one receipt (no 'running' row left), the chain verifies, the node's counters agree with
its ledger, the outputs of one prompt agree whatever ran beside them (greedy, or sampled with one
seed), every refusal is one of the load refusals, the node logged no traceback, and its open files
did not grow from a third of the way in to the end (its threads, memory and ledger WAL are reported
beside them).

    .venv/bin/python scripts/soak_node.py --seconds 300 --clients 10              # a tiny random model
    .venv/bin/python scripts/soak_node.py --model smollm2-135m-instruct --method auto
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sqlite3
import subprocess
import tempfile
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "node"))

import grpc  # noqa: E402

from dspark.v1 import job_pb2  # noqa: E402
from dspark.v1.envelope_pb2 import Envelope  # noqa: E402
from dspark.v1.receipt_pb2 import Receipt  # noqa: E402
from node.client import ClientError, JobRefused, WorkerClient  # noqa: E402
from node.identity import Identity  # noqa: E402
from node.ledger_schema import LEDGER_FILE  # noqa: E402
from node_harness import node_toml, start_daemon  # noqa: E402

PROMPTS = ["Count: 1 2 3", "def fib(n):", "Hello, my name is", "The capital of France is", "Write a poem"]
EXPECTED_REFUSALS = {"queue_full", "too_many_concurrent", "rate_limited", "replayed"}
# Open files may differ by a few between samples (a connection closing, a WAL checkpoint); one leaked
# per job is hundreds.
FD_SLACK = 16


def node_config(model: str, method: str, device: str) -> str:
    # Two slots (node_toml's) and a short line, so that queueing, refusals and cancellations all happen.
    # No limits per address: the clients call from two loopback addresses, which the engine's line for
    # a slot takes as two tenants (engine.py slot_order), so that its order is not only arrival's.
    # Listening on every address, plaintext (TLS is on by default off loopback).
    toml = node_toml(Path(model), f"""method = "{method}"
device = "{device}"
max_queue = 6
[admission]
max_queue = 6
rate_per_minute = 100000
address_rate_per_minute = 0
max_concurrent_per_address = 0
max_concurrent_per_client = 3
[tls]
mode = "off"
""")
    return toml.replace('grpc_listen = "127.0.0.1:0"', 'grpc_listen = "[::]:0"')


@dataclass
class Book:
    """What the clients saw."""
    accepted: dict[bytes, str] = field(default_factory=dict)   # job id -> "done" | "any" | "maybe" (one_job)
    refusals: Counter = field(default_factory=Counter)
    outputs: dict[tuple, tuple] = field(default_factory=dict)   # a job's prompt and sampling -> first output
    repeats: Counter = field(default_factory=Counter)   # outputs compared with an earlier one, greedy / sampled
    problems: list[str] = field(default_factory=list)


async def one_job(client: WorkerClient, book: Book, rng: random.Random) -> None:
    prompt = rng.choice(PROMPTS)
    n = rng.choice([1, 2, 8, 32, 100])
    temperature = rng.choice([0.0, 0.0, 0.7, 1.0])
    top_p = rng.choice([1.0, 0.9])
    stop = rng.choice([(), (), ("\n",)])
    seed = rng.choice([7, 8])     # few seeds, so that one sampled job recurs: it must recur alike
    job = client.sign_job(text=prompt, max_new_tokens=n, temperature=temperature, top_p=top_p, seed=seed,
                          stop=stop)
    job_id = job_pb2.JobRequest.FromString(job.payload).job_id
    action = rng.choice(["run", "run", "run", "cancel", "close", "deadline", "replay"])
    # What the ledger must hold for the job in the end: "done" (a receipt), "any" (accepted, then
    # cancelled or closed: a receipt), "maybe" (the deadline passed, perhaps before acceptance).
    try:
        if action in ("run", "replay"):
            result = await client.run(job, timeout_s=120)
            book.accepted[job_id] = "done"
            if result.finished:
                key = (prompt, n, stop) + ((temperature, top_p, seed) if temperature else ())
                prev = book.outputs.setdefault(key, result.output_ids)
                book.repeats["sampled" if temperature else "greedy"] += prev is not result.output_ids
                if prev != result.output_ids:
                    book.problems.append(f"output differs for {key}: {prev[:8]} vs {result.output_ids[:8]}")
            if action == "replay":
                try:
                    await client.run(job, timeout_s=30)
                    book.problems.append("a replayed job was accepted")
                except JobRefused as exc:     # replayed, or a load refusal checked before it
                    if exc.reason not in EXPECTED_REFUSALS:
                        book.problems.append(f"replay refused as {exc.reason}: {exc}")
            if rng.random() < 0.5:
                await client.acknowledge(result.receipt_envelope)
        elif action in ("cancel", "close"):
            stream = client.stream(job, timeout_s=120)
            accepted = False
            async for event in stream:
                kind = event.WhichOneof("event")
                if kind == "accepted":
                    accepted = True
                    book.accepted[job_id] = "any"
                if kind == "chunk" and rng.random() < 0.5:
                    break
                if kind == "result":
                    break
            if action == "cancel" and accepted:
                await client.cancel(job_id)
            await stream.aclose()
        else:
            try:
                await client.run(job, timeout_s=rng.choice([0.05, 0.3, 1.0]))
                book.accepted[job_id] = "done"
            except JobRefused as exc:
                if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    book.accepted[job_id] = "maybe"
                else:
                    raise
    except JobRefused as exc:
        book.refusals[exc.reason or exc.code.name] += 1
        await asyncio.sleep(rng.uniform(0.05, 0.2))      # a client backs off a busy node
        if (exc.reason or "") not in EXPECTED_REFUSALS:
            book.problems.append(f"{action}: unexpected refusal {exc}")
    except ClientError as exc:
        book.problems.append(f"{action}: client error {exc}")


async def client_loop(grpc_addr: str, peer_id: str, book: Book, seed: int, until: float) -> None:
    """One client identity with two jobs in flight at a time, so that the node's slots, its line
    and the per-client quota all fill."""
    async def submitting(rng: random.Random) -> None:
        while time.monotonic() < until:
            await one_job(client, book, rng)

    async with await WorkerClient.connect(grpc_addr, Identity.generate(), peer_id=peer_id) as client:
        await asyncio.gather(*(submitting(random.Random(seed * 2 + i)) for i in range(2)))


def metrics(http: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"{http}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(dspark_jobs_(?:admitted|finished|refused)_total(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def resources(pid: int, data: Path) -> dict[str, int]:
    """What a leak grows, read from /proc (Linux): open files, threads, resident memory, the WAL."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    wal = data / f"{LEDGER_FILE}-wal"
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(status["Threads"]),
            "rss_kib": int(status["VmRSS"].split()[0]), "wal_bytes": wal.stat().st_size if wal.exists() else 0}


async def sample_resources(pid: int, data: Path, seconds: float) -> list[dict[str, int]]:
    """Once warm (a third of the way in) and near the end, while the clients still submit."""
    await asyncio.sleep(seconds / 3)
    warm = resources(pid, data)
    await asyncio.sleep(max(0.0, seconds * 2 / 3 - 1))
    return [warm, resources(pid, data)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120, help="how long the clients keep submitting")
    ap.add_argument("--clients", type=int, default=10, help="client identities submitting at once")
    ap.add_argument("--model", default="", help="engine.model (default: a tiny random Llama)")
    ap.add_argument("--method", default="auto", help="engine.method")
    ap.add_argument("--device", default="cpu", help="engine.device (cuda on a GPU)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dspark-soak-") as tmp:
        problems = asyncio.run(soak(Path(tmp), args))
    print("\n".join(problems[:30]) or "no problems")
    return 1 if problems else 0


async def soak(tmp: Path, args: argparse.Namespace) -> list[str]:
    model = args.model
    if not model:
        from engine.testing import make_tiny_model
        # An untied LM head: a tied random model repeats its input, and its sampling is near greedy.
        model = str(make_tiny_model(tmp / "tiny", lm_head_std=0.4))
    data = tmp / "node"
    node = start_daemon(data, node_config(model, args.method, args.device))
    print("serving on", node.ready["grpc"], node.ready["http"], flush=True)
    book = Book()
    started = time.monotonic()
    until = started + args.seconds
    sampled = asyncio.create_task(sample_resources(node.proc.pid, data, args.seconds))
    port = node.ready["grpc"].rpartition(":")[2]
    await asyncio.gather(*(client_loop(f"{('127.0.0.1', '[::1]')[i % 2]}:{port}", node.peer_id, book, i, until)
                           for i in range(args.clients)))
    warm, end = await sampled
    await asyncio.sleep(3)      # cancelled jobs' receipts are written after their streams end
    served_s = time.monotonic() - started
    counters = metrics(node.ready["http"])
    rc = node.stop()
    problems = book.problems
    if rc != 0:
        problems.append(f"the node exited {rc} on SIGTERM")
    if end["fds"] > warm["fds"] + FD_SLACK:
        problems.append(f"the node's open files grew from {warm['fds']} to {end['fds']} under a steady load")
    with contextlib.closing(sqlite3.connect(data / LEDGER_FILE)) as conn:
        running = conn.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone()[0]
        receipts = dict(conn.execute("SELECT job_id, outcome FROM receipts").fetchall())
        envelopes = [Envelope.FromString(row[0]) for row in conn.execute("SELECT envelope FROM receipts")]
    if running:
        problems.append(f"{running} jobs left 'running' in the ledger")
    problems += [f"accepted job {job_id.hex()} has no receipt" for job_id, want in book.accepted.items()
                 if want in ("done", "any") and job_id not in receipts]
    outcomes = Counter(receipts.values())
    if outcomes["failed"]:
        problems.append(f"{outcomes['failed']} jobs failed in a healthy node")
    for outcome, count in outcomes.items():
        counted = counters.get(f'dspark_jobs_finished_total{{outcome="{outcome}"}}', 0)
        if counted != count:
            problems.append(f"the node counted {counted:.0f} {outcome} jobs, its ledger holds {count}")
    # One device, one engine thread: its jobs' shares of the passes cannot add up to more time than
    # the node served (receipts billed each pass's whole time once per job in it, 2x with two slots).
    billed_s = sum(Receipt.FromString(e.payload).gpu_seconds for e in envelopes)
    if billed_s > served_s:
        problems.append(f"the receipts bill {billed_s:.1f} GPU-seconds for {served_s:.1f} s of serving")
    verify = subprocess.run([sys.executable, "-m", "node.cli", "receipts", "verify", "--data-dir", str(data)],
                            cwd=ROOT, capture_output=True, text=True)
    if verify.returncode != 0:
        problems.append(f"receipts verify: {verify.stdout}{verify.stderr}")
    log = node.stderr_text()
    if "Traceback" in log:
        at = log.index("Traceback")
        problems.append(f"the node logged a traceback (whole log: {data / 'stderr.log'}):\n"
                        f"{log[max(0, at - 1500):at + 4000]}")
    print(json.dumps({"receipts": len(receipts), "outcomes": outcomes, "client_refusals": book.refusals,
                      "gpu_seconds_billed": round(billed_s, 2), "served_seconds": round(served_s, 2),
                      "outputs_compared": book.repeats,
                      "verify": verify.stdout.strip(), "resources": {"warm": warm, "end": end}}, default=str),
          flush=True)
    return problems


if __name__ == "__main__":
    sys.exit(main())
