"""The dashboard of a real daemon (`dspark-node run`, embedded SmolLM2 with prompt lookup) under a
load of concurrent signed jobs from real gRPC clients, seen in Debian's headless Chromium."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from node.client import JobResult, WorkerClient
from node.identity import Identity

from .harness import ARTIFACTS, CHROMIUM_ARGS

pytestmark = pytest.mark.slow
# Jobs long enough (seconds each) that the page, which lists active jobs 0.5 s after they are
# admitted and updates their tokens once a second, sees several running: at 32 tokens a quiet box
# finished them in ~1.6 s, and the listing sometimes caught none with 8 tokens yet.
CLIENTS, JOBS_PER_CLIENT, NEW_TOKENS = 3, 2, 96
PROMPT = "Write a Python function that returns the sum of the squares of a list of numbers, with a docstring."


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("daemon")
    (home / "node.toml").write_text('[engine]\nmethod = "ngram"\nmax_batch = 4\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "run", "--config", str(home / "node.toml"), "--data-dir", str(home / "data"),
         "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--p2p-listen", ""],
        stdout=subprocess.PIPE, stderr=open(home / "daemon.log", "wb"), text=True)
    ready: dict = {}

    def read_ready() -> None:
        for line in proc.stdout:
            if line.startswith("{"):
                ready.update(json.loads(line))
                return
    reader = threading.Thread(target=read_ready, daemon=True)
    reader.start()
    reader.join(timeout=240)   # the first run converts the embedded model (~40 s)
    if not ready:
        proc.kill()
        pytest.fail(f"daemon not ready; log:\n{(home / 'daemon.log').read_text()[-3000:]}")
    yield ready
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, (home / "daemon.log").read_text()[-3000:]


async def client_jobs(grpc: str, peer_id: str) -> list[JobResult]:
    identity = Identity.generate()
    async with await WorkerClient.connect(grpc, identity, peer_id) as client:
        return [await client.run(client.sign_job(chat=[{"role": "user", "content": PROMPT}],
                                                 max_new_tokens=NEW_TOKENS), timeout_s=300)
                for _ in range(JOBS_PER_CLIENT)]


def run_load(ready: dict, results: list) -> None:
    async def load() -> None:
        batches = await asyncio.gather(*(client_jobs(ready["grpc"], ready["peer_id"]) for _ in range(CLIENTS)))
        results.extend(r for batch in batches for r in batch)
    asyncio.run(load())


def test_status_gives_the_addresses_as_bound(daemon):
    # started with --grpc-listen 127.0.0.1:0: the status said port 0, not the one clients must use
    listen = httpx.get(daemon["http"] + "/api/v1/status", timeout=10).json()["listen"]
    assert listen == {"grpc": daemon["grpc"], "http": daemon["http"].removeprefix("http://"), "p2p": []}


def test_dashboard_under_concurrent_load(daemon, chromium, promtool):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        problems: list[str] = []
        page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(daemon["http"] + "/")
        page.wait_for_function("document.getElementById('model').textContent.toLowerCase().includes('smollm2')")
        assert page.text_content("#device").startswith("cpu")
        assert page.text_content("#peer-id") == daemon["peer_id"]

        results: list[JobResult] = []
        load = threading.Thread(target=run_load, args=(daemon, results))
        load.start()
        # Several jobs streaming at once, each with a live speed.
        page.wait_for_function("""() => [...document.querySelectorAll('#active-jobs tbody tr')].filter(
            r => r.cells.length === 6 && parseFloat(r.cells[3].textContent) > 0
                 && parseInt(r.cells[2].textContent) >= 8).length >= 2""", timeout=120_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-daemon-load.png"))
        load.join(timeout=600)
        assert len(results) == CLIENTS * JOBS_PER_CLIENT
        total = sum(r.receipt.amount_micros for r in results)
        page.wait_for_function(f"document.getElementById('receipts').textContent === '{len(results)}'",
                               timeout=15_000)
        assert round(float(page.text_content("#earned")) * 1e6) == total
        assert int(page.text_content("#billed-tokens")) == sum(len(r.output_ids) for r in results)
        page.wait_for_function("document.querySelectorAll('#chart-acceptance rect').length > 0", timeout=15_000)
        page.screenshot(path=str(ARTIFACTS / "dashboard-daemon-after.png"))
        browser.close()
    assert problems == []
    metrics = httpx.get(daemon["http"] + "/metrics", timeout=10).text
    check = subprocess.run([promtool, "check", "metrics"], input=metrics.encode(), capture_output=True, timeout=60)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr
    assert f'dspark_jobs_finished_total{{outcome="completed"}} {float(len(results))}' in metrics
