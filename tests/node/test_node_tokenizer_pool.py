"""Prompts are tokenized in threads below the node's CPU priority (node/service.py TOKENIZE_NICE)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from node.service import TOKENIZE_NICE, tokenizer_pool


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_tokenizer_threads_run_below_the_node_and_leave_its_threads_alone():
    own = _nice()
    pool = tokenizer_pool()
    try:
        theirs = pool.submit(_nice).result(timeout=10)
    finally:
        pool.shutdown()
    assert theirs == min(19, own + TOKENIZE_NICE)
    assert _nice() == own
