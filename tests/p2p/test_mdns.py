"""mDNS discovery on a LAN, simulated by a fresh network namespace with only `lo` (so nothing
leaks onto the machine's real interfaces). Skipped, saying why, where namespaces are not allowed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SETUP = "ip link set lo up && ip link set lo multicast on"


def _namespace_unavailable() -> str | None:
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", SETUP], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot create a network namespace here: {probe.stderr.strip() or probe.returncode}"
    return None


def test_client_finds_a_worker_by_mdns_alone():
    reason = _namespace_unavailable()
    if reason:
        print(f"mDNS test skipped: {reason}")
        pytest.skip(reason)
    run = subprocess.run(["unshare", "-n", "sh", "-c", f'{SETUP} && exec "$0" "$1"', sys.executable,
                          str(HERE / "mdns_check.py")],
                         capture_output=True, text=True, timeout=180, cwd=HERE.parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"\nmDNS: client saw the worker {result['elapsed_s']} s after starting (no bootstrap peer)")
    assert result["seen"] == [result["worker"]]
    # The library's discovery handlers are process-wide: a stopped client left its own registered, and
    # with it its whole host, for the life of the process (one per job joined by mDNS).
    assert result["handlers_left"] == 0
