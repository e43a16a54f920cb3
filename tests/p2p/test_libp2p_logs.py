"""py-libp2p's log lines go through the node's logging: formatted at --log-level DEBUG, and not at
all otherwise (they were bare last-resort lines on stderr, an ERROR per redial of a departed peer)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import logging, sys
import node.p2p.host as host          # imports libp2p, which turns its own loggers off
logging.basicConfig(level=sys.argv[1], format="%(levelname)s %(name)s: %(message)s")
host.route_libp2p_logs()
logging.getLogger("libp2p.transport.tcp").error("Failed to open TCP stream: all attempts failed")
logging.getLogger("libp2p.kad_dht").debug("routing table refreshed")
logging.getLogger("libp2p.network.auto_connector").info("Connections (1) below target (40); initiating 39 new dials")
"""


def stderr_at(level: str, **env: str) -> str:
    ran = subprocess.run([sys.executable, "-c", PROGRAM, level], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", **env})
    assert ran.returncode == 0, ran.stderr
    return ran.stderr


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_libp2p_lines_are_not_printed_below_debug(level):
    """Nor those of a libp2p logger that sets its own level: the auto-connector's INFO lines came out
    at every log level, two every 10 s on a node with fewer than 8 peers."""
    stderr = stderr_at(level)
    assert "Failed to open TCP stream" not in stderr and "new dials" not in stderr


def test_at_debug_libp2p_warnings_come_formatted_by_the_node():
    lines = stderr_at("DEBUG").splitlines()
    assert "ERROR libp2p.transport.tcp: Failed to open TCP stream: all attempts failed" in lines
    assert not any("routing table refreshed" in line for line in lines)     # libp2p's own debug stays off
    assert not any("new dials" in line for line in lines)                   # and its info
