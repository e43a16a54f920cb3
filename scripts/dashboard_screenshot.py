"""The README's dashboard picture: a real `dspark-node run` on its embedded defaults (SmolLM2 with
the shipped DSpark drafter, `method = auto`), a few clients sending signed jobs over gRPC, and one
full-page screenshot in Debian's headless Chromium once the jobs are billed.

    .venv/bin/python scripts/dashboard_screenshot.py --prompts ../shared/eval/humaneval.jsonl \\
        --prompts ../shared/eval/mt-bench.jsonl --out docs/img/dashboard.png

The test of the same page under load is tests/dashboard/test_daemon_dashboard.py; this only draws.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "node"))

from engine.prompts import load_first_turns  # noqa: E402
from node.client import WorkerClient  # noqa: E402
from node.identity import Identity  # noqa: E402
from node_harness import start_daemon  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
TOML = 'grpc_listen = "127.0.0.1:0"\nhttp_listen = "127.0.0.1:0"\n[p2p]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n'


async def client_jobs(grpc: str, peer_id: str, prompts: list[str], max_new_tokens: int) -> None:
    async with await WorkerClient.connect(grpc, Identity.generate(), peer_id) as client:
        for i, prompt in enumerate(prompts):
            # Every other job sampled, so the page shows both kinds of request.
            await client.run(client.sign_job(chat=[{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                                             temperature=0.7 if i % 2 else 0.0, seed=i), timeout_s=900)


def run_load(daemon, prompts: list[str], clients: int, max_new_tokens: int) -> None:
    async def load() -> None:
        await asyncio.gather(*(client_jobs(daemon.grpc, daemon.peer_id, prompts[c::clients], max_new_tokens)
                               for c in range(clients)))
    asyncio.run(load())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, action="append", required=True,
                        help="JSONL prompt file (repeatable; first turns are taken in turn from each)")
    parser.add_argument("--jobs", type=int, default=12, help="jobs in all")
    parser.add_argument("--clients", type=int, default=4, help="client identities sending at once")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    args = parser.parse_args()
    sets = [load_first_turns(path, args.jobs) for path in args.prompts]
    prompts = [p for group in zip(*sets) for p in group][:args.jobs]

    from playwright.sync_api import sync_playwright
    daemon = start_daemon(Path(tempfile.mkdtemp(prefix="dashboard-")), TOML)
    try:
        load = threading.Thread(target=run_load, args=(daemon, prompts, args.clients, args.max_new_tokens))
        load.start()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(daemon.ready["http"] + "/")
            load.join()
            page.wait_for_function(f"document.getElementById('receipts').textContent === '{len(prompts)}'",
                                   timeout=60_000)
            page.wait_for_function("document.querySelectorAll('#draft-sources tbody tr').length > 0", timeout=60_000)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        daemon.stop()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
