"""Ctrl-C while the node loads its model ends the start at once, cleanly, and leaves no data dir."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# `dspark-node run` whose model load is a minute of torch work on two threads, as a first start's
# conversion or SPS profile is: nothing can interrupt it.
SLOW_LOAD = """
import sys, time, torch
import node.daemon

def slow_load(config):
    torch.set_num_threads(2)
    until = time.monotonic() + 60
    while time.monotonic() < until:
        torch.ones(256, 256) @ torch.ones(256, 256)

node.daemon.load_async_engine = slow_load
from node.cli import main
sys.exit(main())
"""


def test_ctrl_c_during_the_model_load_exits_at_once_and_removes_the_new_data_dir(tmp_path):
    data = tmp_path / "node"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, "run", "--data-dir", str(data), "--grpc-listen",
                             "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--p2p-listen", ""],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (data / "ledger.sqlite3").exists():    # opened just before the load
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
    finally:
        proc.kill()
        proc.wait()
    assert not data.exists()
