"""docs/sdk.md's example program, run as shown against a real node: the SDK's documentation cannot
drift from the SDK."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys

import pytest

from node.ledger_schema import LEDGER_FILE
from node_harness import ROOT, node_toml, start_daemon

pytestmark = pytest.mark.slow


def example_program() -> str:
    section = (ROOT / "docs" / "sdk.md").read_text().split("## A job on one worker", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_the_documented_example_runs_a_job_and_countersigns_its_receipt(tiny_model, tmp_path):
    node = start_daemon(tmp_path / "node", node_toml(tiny_model))
    try:
        program = tmp_path / "example.py"
        program.write_text(example_program())
        env = {**os.environ, "DSPARK_NODE": node.grpc, "DSPARK_PEER_ID": node.peer_id,
               "DSPARK_CLIENT_KEY": str(tmp_path / "client.key")}
        ran = subprocess.run([sys.executable, str(program)], env=env, capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert ran.returncode == 0, ran.stderr[-3000:]
        assert re.search(r"^(stop|length): \d+ tokens, \d+ micros, receipt #1$", ran.stdout, flags=re.M), ran.stdout
        assert (tmp_path / "client.key").is_file()
        with sqlite3.connect(tmp_path / "node" / LEDGER_FILE) as ledger:
            assert ledger.execute("SELECT sequence FROM acknowledgments").fetchall() == [(1,)]
    finally:
        assert node.stop() == 0, node.stderr_text()[-3000:]
