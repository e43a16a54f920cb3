"""Real processes for the gateway tests: `dspark-node gateway` on a free loopback port, in front
of a peer network of `dspark-node run` daemons (the p2p and node tests' harnesses, reused)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180        # the CLI imports torch and libp2p: tens of seconds on a loaded 2-core box
sys.path.insert(0, str(ROOT / "tests" / "node"))


@dataclass
class GatewayProc:
    proc: subprocess.Popen
    data_dir: Path
    ready: dict

    @property
    def base_url(self) -> str:
        return self.ready["base_url"]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def start_gateway(data_dir: Path, bootstrap: str, *args: str) -> GatewayProc:
    data_dir.mkdir(parents=True, exist_ok=True)
    stderr = (data_dir / "stderr.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--log-level", "INFO", "gateway", "--listen", "127.0.0.1:0",
         "--bootstrap", bootstrap, "--data-dir", str(data_dir), *args],
        cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:   # keeps reading, so a chatty gateway never blocks on a full pipe
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        proc.kill()
        raise RuntimeError(f"gateway not ready after {START_TIMEOUT_S} s") from None
    ready = json.loads(line) if line.startswith("{") else {}
    if ready.get("event") != "ready":
        proc.kill()
        raise RuntimeError(f"gateway failed to start: {(data_dir / 'stderr.log').read_text()[-3000:]}")
    return GatewayProc(proc, data_dir, ready)


def wait_for_workers(base_url: str, model: str, count: int, api_key: str | None = None,
                     timeout_s: float = 30.0) -> dict:
    """Poll GET /v1/models until `count` workers serve `model`; returns its card."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    card: dict = {}
    while time.monotonic() < deadline:
        models = httpx.get(f"{base_url}/models", headers=headers, timeout=10).json()["data"]
        card = next((m for m in models if m["id"] == model), {})
        if card and card["dspark"]["workers"] >= count:
            return card
        time.sleep(0.3)
    raise RuntimeError(f"the gateway sees {card or 'no worker'} for {model}, expected {count} workers")
