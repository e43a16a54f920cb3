"""A running job's speed while other clients flood the node with jobs, most of which it must refuse.

A real `dspark-node run` (tiny random model) pinned to CPU 0; this process and the flooding clients
pinned to CPU 1, so that the flood costs the node only what the node itself spends on it. Each
flooding client (its own key) sends jobs one after another: `chat`, 120k empty messages (1 MiB;
refused before tokenizing since 82725e8), or `text`, random ASCII as long as admission lets through
untokenized (tokenized, then refused as too long), both pre-signed; or `jobs`, valid 200-token jobs
signed as they go, eight at once (a client's limit), to hold the node's queue. Meanwhile one honest
client runs a 600-token job, three times; medians printed, one JSON row per flood kind. Linux only
(taskset). The flooders call from ::1 and the honest client from 127.0.0.1, two sources for the
node's limits per address: one node per pair of `--address-rates` and `--address-held` values, in
turn (0 is no limit).

    .venv/bin/python scripts/prompt_flood.py --kinds none,chat,text,none --clients 4 --address-rates 0,600
    .venv/bin/python scripts/prompt_flood.py --kinds jobs --clients 16 --address-held 0,32
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "node"))

from transformers import AutoTokenizer  # noqa: E402

from node.client import ClientError, JobRefused, WorkerClient  # noqa: E402
from node.identity import Identity  # noqa: E402
from node.service import longest_token_bytes  # noqa: E402
from node_harness import CONTEXT, node_toml, start_daemon  # noqa: E402


def dial(grpc: str, host: str) -> str:
    return f"{host}:{grpc.rpartition(':')[2]}"


async def flood(grpc: str, peer_id: str, kind: str, text_bytes: int, seconds: float, seed: int) -> int:
    """One flooding client, sending for `seconds`; returns how many jobs it sent."""
    rng = random.Random(seed)
    async with await WorkerClient.connect(dial(grpc, "[::1]"), Identity.generate(), peer_id=peer_id) as client:
        if kind == "jobs":
            print("ready", flush=True)
            end = time.monotonic() + seconds
            return sum(await asyncio.gather(*(send_jobs(client, lambda: client.sign_job(
                text="Count: 1 2 3", max_new_tokens=200), end) for _ in range(8))))
        jobs = [client.sign_job(chat=[{"role": "user", "content": ""}] * 120_000, max_new_tokens=1, ttl_s=3600)
                if kind == "chat" else
                client.sign_job(text="".join(rng.choice(string.ascii_lowercase + " ,.;") for _ in range(text_bytes)),
                                max_new_tokens=1, ttl_s=3600) for _ in range(8)]
        print("ready", flush=True)
        return await send_jobs(client, itertools.cycle(jobs).__next__, time.monotonic() + seconds)


async def send_jobs(client: WorkerClient, next_job, end: float) -> int:
    """One job after another until `end`, each waited for; how many were sent."""
    sent = 0
    while time.monotonic() < end:
        try:
            await client.run(next_job(), timeout_s=30)
        except (JobRefused, ClientError):
            pass
        sent += 1
    return sent


async def flooders(args: argparse.Namespace) -> None:
    counts = await asyncio.gather(*(flood(args.grpc, args.peer_id, args.kind, args.text_bytes, args.seconds, i)
                                    for i in range(args.clients)))
    print(json.dumps({"sent": counts}), flush=True)


async def honest_job(grpc: str, peer_id: str) -> float | str:
    """The honest client's job: its seconds, or the reason it was refused."""
    async with await WorkerClient.connect(dial(grpc, "127.0.0.1"), Identity.generate(), peer_id=peer_id) as client:
        started = time.monotonic()
        try:
            await client.run(client.sign_job(text="Count: 1 2 3", max_new_tokens=600), timeout_s=600)
        except JobRefused as refusal:
            return refusal.reason
        return time.monotonic() - started


async def measure(args: argparse.Namespace) -> None:
    from engine.testing import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="dspark-flood-") as tmp:
        model = make_tiny_model(Path(tmp) / "tiny")
        text_bytes = CONTEXT * longest_token_bytes(AutoTokenizer.from_pretrained(model))
        os.sched_setaffinity(0, {1})     # this process and the flooders it starts
        for rate, held in itertools.product(map(int, args.address_rates.split(",")),
                                            map(int, args.address_held.split(","))):
            await measure_node(args, model, text_bytes, Path(tmp) / f"node-{rate}-{held}", rate, held)


async def measure_node(args: argparse.Namespace, model: Path, text_bytes: int, data_dir: Path, rate: int,
                       held: int) -> None:
    # Every address of the host, plaintext (TLS is on by default off loopback), for the two sources.
    toml = node_toml(model, f"[admission]\nrate_per_minute = 1000000\naddress_rate_per_minute = {rate}\n"
                            f"max_concurrent_per_address = {held}\n[tls]\nmode = \"off\"\n")
    node = start_daemon(data_dir, toml.replace('grpc_listen = "127.0.0.1:0"', 'grpc_listen = "[::]:0"'))
    try:
        subprocess.run(["taskset", "-a", "-cp", "0", str(node.proc.pid)], check=True, capture_output=True)
        for kind in args.kinds.split(","):
            proc = None
            if kind != "none":
                proc = subprocess.Popen([sys.executable, __file__, "--flood", kind, "--grpc", node.grpc,
                                         "--peer-id", node.peer_id, "--text-bytes", str(text_bytes),
                                         "--clients", str(args.clients), "--seconds", str(args.seconds)],
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
                for _ in range(args.clients):
                    proc.stdout.readline()      # "ready": its jobs are signed
            times = [await honest_job(node.grpc, node.peer_id) for _ in range(3)]
            sent = json.loads(proc.communicate()[0])["sent"] if proc else []
            served = [t for t in times if isinstance(t, float)]
            print(json.dumps({"address_rate_per_minute": rate, "max_concurrent_per_address": held, "flood": kind,
                              "clients": len(sent), "flood_jobs_sent": sum(sent),
                              "honest_job_s": [round(t, 2) if isinstance(t, float) else t for t in times],
                              "honest_job_median_s": round(statistics.median(served), 2) if served else None}),
                  flush=True)
    finally:
        node.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="none,chat,text,none", help="flood kinds in turn: none, chat, text, jobs")
    ap.add_argument("--clients", type=int, default=4, help="flooding clients, each with its own key")
    ap.add_argument("--seconds", type=float, default=25, help="how long each flood lasts")
    ap.add_argument("--address-rates", default="600", help="the node's admission.address_rate_per_minute, "
                                                            "one node per value in turn (0: no limit)")
    ap.add_argument("--address-held", default="32", help="the node's admission.max_concurrent_per_address, "
                                                         "one node per value in turn (0: no limit)")
    ap.add_argument("--flood", help=argparse.SUPPRESS)           # internal: run as the flooding process
    ap.add_argument("--grpc", help=argparse.SUPPRESS)
    ap.add_argument("--peer-id", help=argparse.SUPPRESS)
    ap.add_argument("--text-bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flood:
        args.kind = args.flood
        asyncio.run(flooders(args))
    else:
        asyncio.run(measure(args))


if __name__ == "__main__":
    main()
