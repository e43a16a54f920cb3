"""`dspark-node run` on a data dir a running node holds, on that node's ports: the refusal names the
data dir, the real cause, not the ports (a child process each; the running node is this test
process, holding the data dir's lock and a port as a node does)."""

from __future__ import annotations

import socket
import subprocess
import sys

from node.daemon import locked
from node_harness import ROOT


def test_a_second_node_with_the_same_ports_is_told_the_data_dir_is_in_use(tmp_path):
    with locked(tmp_path), socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The defaults of two starts with no --grpc-listen are one port: the first node holds it.
        ran = subprocess.run([sys.executable, "-m", "node.cli", "run", "--data-dir", str(tmp_path), "--grpc-listen",
                              f"127.0.0.1:{port}", "--http-listen", "127.0.0.1:0", "--p2p-listen", ""],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2, ran.stderr
    assert f"data_dir {tmp_path} is in use by another running node" in ran.stderr, ran.stderr
    assert "cannot listen there" not in ran.stderr and "Traceback" not in ran.stderr


def test_a_taken_port_on_a_data_dir_this_start_made_leaves_no_data_dir(tmp_path):
    # The lock comes first now, so the data dir is made before the ports are tried.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = subprocess.run([sys.executable, "-m", "node.cli", "run", "--data-dir", str(tmp_path / "new" / "data"),
                              "--grpc-listen", "127.0.0.1:0", "--http-listen", f"127.0.0.1:{port}", "--p2p-listen", ""],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2 and f"http_listen 127.0.0.1:{port}: cannot listen there" in ran.stderr, ran.stderr
    assert not (tmp_path / "new").exists()
