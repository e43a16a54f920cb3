"""Real peer processes for the p2p tests: tests/p2p/static_worker.py runs the real P2PService."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATIC_WORKER = Path(__file__).with_name("static_worker.py")


@dataclass
class Peer:
    proc: subprocess.Popen
    peer_id: str
    addrs: list[str]

    @property
    def addr(self) -> str:
        return self.addrs[0]

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop the process; returns what it printed after the ready line."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


def spawn_peer(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(STATIC_WORKER), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)


def ready_peer(proc: subprocess.Popen, args: tuple[str, ...] = ()) -> Peer:
    line = proc.stdout.readline()  # the child prints its ready line within seconds or dies
    if not line:
        proc.kill()
        raise RuntimeError(f"static worker {args} exited with {proc.wait()} before it was ready")
    ready = json.loads(line)
    return Peer(proc, ready["peer_id"], ready["addrs"])


@pytest.fixture(scope="module")
def peer_factory():
    """Start peers with `peer_factory(*args)`; all are stopped at the end of the module."""
    started: list[Peer] = []

    def factory(*args: str) -> Peer:
        return many([args])[0]

    def many(arg_lists: list[tuple[str, ...]]) -> list[Peer]:
        """Start several peers at once (process start-up dominates; 2 cores overlap it)."""
        procs = [spawn_peer(*args) for args in arg_lists]
        peers = [ready_peer(proc, args) for proc, args in zip(procs, arg_lists)]
        started.extend(peers)
        return peers

    factory.many = many
    yield factory
    for peer in started:
        peer.stop(signal.SIGKILL)
