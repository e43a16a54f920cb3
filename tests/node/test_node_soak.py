"""A short soak of a real node (scripts/soak_node.py): sixteen jobs in flight from two addresses (two
tenants in the engine's line) against two slots and a line of six, submitted, cancelled, closed,
timed out, replayed and acknowledged at random; afterwards every accepted job has one receipt, none
failed, the chain verifies, the counters agree with the ledger, and the outputs of one prompt agree."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "soak_node.py"


@pytest.mark.asyncio
async def test_a_short_soak_finds_no_problem(tmp_path):
    spec = importlib.util.spec_from_file_location("soak_node", SCRIPT)
    soak_node = importlib.util.module_from_spec(spec)
    sys.modules["soak_node"] = soak_node      # its dataclass looks its module up there
    spec.loader.exec_module(soak_node)
    args = argparse.Namespace(seconds=15, clients=8, model="", method="auto", device="cpu")
    problems = await soak_node.soak(tmp_path, args)
    assert not problems, "\n\n".join(problems)
