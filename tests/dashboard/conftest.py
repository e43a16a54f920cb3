"""Fixtures for the dashboard tests: tools from Debian packages, installed when missing."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def debian_tool(binary: str, package: str) -> str:
    """Path of `binary`, installing its Debian package first if needed; skips (saying why) if impossible."""
    path = shutil.which(binary)
    if path:
        return path
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    try:
        # A fresh machine has no package lists yet: update first, then install.
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
            subprocess.run(command, check=True, capture_output=True, timeout=600, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        reason = f"{binary} is missing and `apt-get install {package}` failed: {exc}"
        print(reason)
        pytest.skip(reason)
    path = shutil.which(binary)
    if not path:
        reason = f"`apt-get install {package}` ran but {binary} is still not on PATH"
        print(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return debian_tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def chromium() -> str:
    return debian_tool("chromium", "chromium")
