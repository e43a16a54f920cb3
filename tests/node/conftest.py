"""Shared fixtures of the node tests (helpers live in node_harness.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
