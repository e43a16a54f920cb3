"""Overhead of the node around the engine: the same prompts, greedy, through gRPC vs in-process.

In-process: this process loads the engine and calls `AsyncEngine.generate` directly. Through the
node: a real `dspark-node run` child process with the same engine settings, driven by the client
SDK (signing each job, streaming, verifying each receipt), one client identity per concurrent job.
The two are interleaved (A B A B, the machine is shared and timings swing) and medians reported.

    .venv/bin/python scripts/bench_node.py --clients 1,16 --max-new-tokens 32 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "node"))

from engine.api import GenerationRequest, SamplingParams, TokenChunk  # noqa: E402
from engine.async_engine import load_async_engine  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from node.client import WorkerClient  # noqa: E402
from node.identity import Identity  # noqa: E402
from node_harness import start_daemon  # noqa: E402

PROMPTS = [
    "Write a Python function that reverses a string.", "What is the capital of France?",
    "Explain recursion in one paragraph.", "List three prime numbers.", "Write a haiku about the sea.",
    "How do I sort a list in Python?", "What does HTTP stand for?", "Give me a tip for learning math.",
    "Describe a cat in two sentences.", "Write a SQL query selecting all rows from users.",
    "What is 12 times 12?", "Name a famous physicist.", "Write a short greeting for an email.",
    "What is a binary tree?", "Suggest a name for a dog.", "Why is the sky blue?",
]


def run_stats(ttfts: list[float], tokens: int, wall: float, outputs: list[tuple[int, ...]]) -> dict:
    return {"ttft_ms": statistics.median(ttfts) * 1000, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "outputs": outputs}


async def in_process(engine, clients: int, max_new: int) -> dict:
    async def one(i: int) -> tuple[float, tuple[int, ...]]:
        started = time.perf_counter()
        ttft = None
        # Tokenizing is part of the request's path on both sides.
        prompt = tuple(engine.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]))
        async for item in engine.generate(GenerationRequest(f"b{i}-{time.monotonic_ns()}", prompt,
                                                            SamplingParams(max_new_tokens=max_new))):
            if isinstance(item, TokenChunk) and ttft is None:
                ttft = time.perf_counter() - started
            result = item
        return ttft, tuple(result.output_ids)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - started
    return run_stats([r[0] for r in results], sum(len(r[1]) for r in results), wall, [r[1] for r in results])


async def through_node(endpoint: str, peer_id: str, identities: list[Identity], clients: int, max_new: int) -> dict:
    connections = [await WorkerClient.connect(endpoint, identities[i], peer_id=peer_id) for i in range(clients)]
    try:
        async def one(i: int):
            client = connections[i]
            job = client.sign_job(chat=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_new_tokens=max_new)
            return await client.run(job, timeout_s=600)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(clients)))
        wall = time.perf_counter() - started
    finally:
        for connection in connections:
            await connection.close()
    return run_stats([r.time_to_first_token_s for r in results], sum(len(r.output_ids) for r in results), wall,
                     [r.output_ids for r in results])


async def main(args: argparse.Namespace) -> dict:
    clients_list = [int(c) for c in args.clients.split(",")]
    settings = {"model": args.model, "max_batch": max(clients_list), "max_context": 1024, "threads": args.threads}
    engine = load_async_engine(EngineConfig(**settings))
    await engine.start()
    data_dir = Path(tempfile.mkdtemp(prefix="bench-node-"))
    toml = (f'grpc_listen = "127.0.0.1:0"\nhttp_listen = "127.0.0.1:0"\n[p2p]\nlisten = []\n[engine]\n'
            f'model = "{args.model}"\nmax_batch = {settings["max_batch"]}\nmax_context = 1024\n'
            + (f"threads = {args.threads}\n" if args.threads else ""))
    daemon = start_daemon(data_dir, toml)
    identities = [Identity.generate() for _ in range(max(clients_list))]
    report: dict = {"settings": {**settings, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats}}
    try:
        # Warm-up both paths (first forward passes allocate).
        await in_process(engine, 1, 4)
        await through_node(daemon.grpc, daemon.peer_id, identities, 1, 4)
        for clients in clients_list:
            runs: dict[str, list[dict]] = {"engine": [], "grpc": []}
            for _ in range(args.repeats):
                runs["engine"].append(await in_process(engine, clients, args.max_new_tokens))
                runs["grpc"].append(await through_node(daemon.grpc, daemon.peer_id, identities, clients,
                                                       args.max_new_tokens))
            same = all(e["outputs"] == g["outputs"] for e, g in zip(runs["engine"], runs["grpc"]))
            row = {"same_outputs": same}
            for path, path_runs in runs.items():
                row[path] = {key: statistics.median(r[key] for r in path_runs)
                             for key in ("ttft_ms", "tokens_per_s", "wall_s")}
            row["throughput_loss_pct"] = 100 * (1 - row["grpc"]["tokens_per_s"] / row["engine"]["tokens_per_s"])
            row["added_ttft_ms"] = row["grpc"]["ttft_ms"] - row["engine"]["ttft_ms"]
            report[f"clients_{clients}"] = row
            print(json.dumps({f"clients_{clients}": row}), file=sys.stderr)
    finally:
        daemon.stop()
        await engine.stop()
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="engine model (embedded default)")
    parser.add_argument("--clients", default="1,16", help="comma-separated concurrent client counts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads of the engine on both sides (default: all cores)")
    parser.add_argument("--json", type=Path, help="write the report here")
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    text = json.dumps(result, indent=2)
    if arguments.json:
        arguments.json.write_text(text + "\n")
    print(text)
