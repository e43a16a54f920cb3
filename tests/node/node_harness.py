"""Real daemons for the node tests: `dspark-node run` as a child process on free loopback ports,
serving a tiny random model (engine.testing.make_tiny_model) so a job takes milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180        # imports torch + transformers + libp2p; minutes on a loaded 2-core box
CONTEXT = 2048               # engine.max_context of node_toml's nodes


def node_toml(model: Path, extra: str = "") -> str:
    return f"""
grpc_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
[p2p]
listen = []
[engine]
model = "{model}"
max_batch = 2
max_context = {CONTEXT}
threads = 1
{extra}
"""


@dataclass
class Daemon:
    proc: subprocess.Popen
    data_dir: Path
    ready: dict
    lines: queue.Queue = field(default_factory=queue.Queue)

    @property
    def grpc(self) -> str:
        return self.ready["grpc"]

    @property
    def peer_id(self) -> str:
        return self.ready["peer_id"]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def stderr_text(self) -> str:
        return (self.data_dir / "stderr.log").read_text()


def start_daemon(data_dir: Path, toml: str, args: tuple[str, ...] = ()) -> Daemon:
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "node.toml"
    config.write_text(toml)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    stderr = (data_dir / "stderr.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "--log-level", "INFO", "run", "--config", str(config),
         "--data-dir", str(data_dir), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            proc.kill()
            raise RuntimeError(f"daemon not ready after {START_TIMEOUT_S} s") from None
        if line is None:
            proc.wait()
            raise RuntimeError(f"daemon exited ({proc.returncode}): {(data_dir / 'stderr.log').read_text()[-3000:]}")
        if line.startswith("{"):
            ready = json.loads(line)
            if ready.get("event") == "ready":
                return Daemon(proc, data_dir, ready, lines)


class FreezingRelay:
    """A TCP relay to an endpoint that can stop passing bytes without closing anything: the path
    to a machine that vanished (a preempted VM sends no FIN)."""

    def __init__(self, target: str) -> None:
        self.host, _, port = target.rpartition(":")
        self.port = int(port)
        self.frozen = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        for writer in self._writers:
            writer.close()
        self._server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(self.host, self.port)
        self._writers += [writer, upstream_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if self.frozen.is_set():
                    return          # bytes stop here; both connections stay open
                sink.write(data)
                await sink.drain()
        with contextlib.suppress(ConnectionError):
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
