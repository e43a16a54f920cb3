"""Overhead of the OpenAI gateway: the same chat jobs, greedy, on one worker, through
`dspark-node gateway` (the official openai SDK, streaming) vs the `dspark-node submit --node` path
(the client SDK: connect, sign, stream, verify; measured in-process, without the CLI's start-up).

Real processes: a p2p bootstrap peer, one `dspark-node run` worker, one `dspark-node gateway`.
Both paths' clocks start before the worker is dialled (the gateway dials per request too), time to
first token ends at the first text, tokens/s is output tokens over the whole request. Interleaved
(A B A B; the machine is shared), medians reported, and the medians of the paired differences
(each gateway run against the submit run just before it), which a neighbour's load skews less.

    .venv/bin/python scripts/bench_gateway.py --max-new-tokens 32 --repeats 5
    .venv/bin/python scripts/bench_gateway.py --tiny --max-new-tokens 64 --repeats 20   # overhead in ms
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
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from node.client import WorkerClient  # noqa: E402
from node.identity import Identity  # noqa: E402
from tests.gateway.harness import start_gateway, wait_for_workers  # noqa: E402
from tests.p2p.conftest import ready_peer, spawn_peer  # noqa: E402
from tests.p2p.test_failover_daemons import worker_toml  # noqa: E402
from node_harness import start_daemon  # noqa: E402  (on sys.path via tests.gateway.harness)

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Explain recursion in one sentence.",
           "List three prime numbers.", "How do I sort a list in Python?"]


async def via_submit(daemon, identity: Identity, prompt: str, max_new: int) -> dict:
    started = time.perf_counter()
    async with await WorkerClient.connect(daemon.grpc, identity, peer_id=daemon.peer_id) as client:
        job = client.sign_job(chat=[{"role": "user", "content": prompt}], max_new_tokens=max_new)
        sent = time.perf_counter()
        result = await client.run(job, timeout_s=600)
    wall = time.perf_counter() - started
    return {"ttft_ms": (sent - started + result.time_to_first_token_s) * 1000, "tokens": len(result.output_ids),
            "wall_s": wall, "text": result.text}


async def via_gateway(client: openai.AsyncOpenAI, model: str, prompt: str, max_new: int) -> dict:
    started = time.perf_counter()
    first = None
    parts: list[str] = []
    tokens = 0
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_new, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - started
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    wall = time.perf_counter() - started
    return {"ttft_ms": first * 1000, "tokens": tokens, "wall_s": wall, "text": "".join(parts)}


def summary(runs: list[dict]) -> dict:
    return {"ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
            "tokens_per_s": statistics.median(r["tokens"] / r["wall_s"] for r in runs),
            "wall_s": statistics.median(r["wall_s"] for r in runs)}


async def measure(args: argparse.Namespace, daemon, base_url: str, model: str) -> dict:
    identity = Identity.generate()
    client = openai.AsyncOpenAI(base_url=base_url, api_key="local", max_retries=0, timeout=600)
    await via_submit(daemon, identity, "Hi", 4)          # warm-up: first forwards allocate
    await via_gateway(client, model, "Hi", 4)
    runs: dict[str, list[dict]] = {"submit": [], "gateway": []}
    for i in range(args.repeats):
        prompt = PROMPTS[i % len(PROMPTS)]
        runs["submit"].append(await via_submit(daemon, identity, prompt, args.max_new_tokens))
        runs["gateway"].append(await via_gateway(client, model, prompt, args.max_new_tokens))
    pairs = list(zip(runs["submit"], runs["gateway"]))
    return {"settings": {"model": "tiny random (engine.testing)" if args.tiny else args.model,
                         "max_new_tokens": args.max_new_tokens, "repeats": args.repeats},
            "submit": summary(runs["submit"]), "gateway": summary(runs["gateway"]),
            "same_outputs": all(s["text"] == g["text"] for s, g in pairs),
            "added_ttft_ms": statistics.median(g["ttft_ms"] - s["ttft_ms"] for s, g in pairs),
            "tokens_per_s_loss_pct": statistics.median(
                100 * (1 - (g["tokens"] / g["wall_s"]) / (s["tokens"] / s["wall_s"])) for s, g in pairs)}


def main(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    bootstrap = ready_peer(spawn_peer())
    daemon = gateway = None
    try:
        if args.tiny:
            from engine.testing import make_tiny_model
            args.model = str(make_tiny_model(work / "tiny"))
        daemon = start_daemon(work / "worker", worker_toml(args.model, bootstrap.addr, 1_000))
        gateway = start_gateway(work / "gateway", bootstrap.addr)
        wait_for_workers(gateway.base_url, daemon.ready["model"], 1)
        return asyncio.run(measure(args, daemon, gateway.base_url, daemon.ready["model"]))
    finally:
        for proc in (gateway, daemon, bootstrap):
            if proc is not None:
                proc.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="worker model (embedded default)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model: isolates the overhead")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the report here")
    arguments = parser.parse_args()
    text = json.dumps(main(arguments), indent=2)
    if arguments.json:
        arguments.json.write_text(text + "\n")
    print(text)
