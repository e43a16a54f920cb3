"""What a dashboard sees of a node stopping (SIGTERM), from a real daemon's HTTP API and live feed:
the drain is announced, and the job it let finish shows finished before the dashboard goes away."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time

import httpx
import pytest

from dspark.v1.job_pb2 import JobRequest
from node.client import WorkerClient
from node.identity import Identity
from node_harness import node_toml, start_daemon

pytestmark = pytest.mark.slow


def _feed_events(url: str, names: list[str], opened: threading.Event) -> None:
    """The live feed's event names, read as a dashboard does, until the node closes it."""
    with contextlib.suppress(httpx.HTTPError), httpx.stream("GET", url, timeout=None) as response:
        opened.set()
        for line in response.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))


def _until(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s")


@pytest.mark.asyncio
async def test_a_draining_node_says_so_and_shows_its_last_job_finished(tiny_model, tmp_path):
    daemon = start_daemon(tmp_path / "node", node_toml(tiny_model, "[admission]\ngrace_s = 30\n"))
    api = daemon.ready["http"] + "/api/v1"
    names: list[str] = []
    opened = threading.Event()
    feed = threading.Thread(target=_feed_events, args=(api + "/events", names, opened), daemon=True)
    feed.start()
    assert opened.wait(30)
    assert httpx.get(api + "/status", timeout=10).json()["draining"] is None
    async with await WorkerClient.connect(daemon.grpc, Identity.generate(), peer_id=daemon.peer_id) as client:
        job = client.sign_job(text="Count:", max_new_tokens=1500)
        events = client.stream(job, timeout_s=120)
        async for event in events:
            if event.WhichOneof("event") == "chunk":
                break
        job_id = JobRequest.FromString(job.payload).job_id.hex()
        daemon.proc.send_signal(signal.SIGTERM)
        draining = await asyncio.to_thread(
            _until, lambda: httpx.get(api + "/status", timeout=10).json()["draining"], 20)
        assert draining["grace_seconds"] == 30 and draining["since"] <= time.time()
        async for event in events:     # the job runs to its end within the grace
            if event.WhichOneof("event") == "result":
                assert event.result.finish_reason in ("stop", "length")

    def finished_shown():
        try:
            recent = httpx.get(api + "/jobs", timeout=5).json()["recent"]
        except httpx.HTTPError:
            raise AssertionError("the dashboard's API stopped before it showed the last job finished") from None
        return any(r["job_id"] == job_id for r in recent)
    await asyncio.to_thread(_until, finished_shown, 20)
    assert daemon.proc.wait(timeout=60) == 0, daemon.stderr_text()[-3000:]
    feed.join(timeout=10)
    assert "draining" in names and names.index("draining") < names.index("finished"), names
