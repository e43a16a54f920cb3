"""Fixtures for the dashboard tests: tools from Debian packages, installed when missing; Chromium and a
page in it; GPUs stood in for."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from .factories import GIB
from .harness import CHROMIUM_ARGS


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


@pytest.fixture
def two_gpus(monkeypatch):
    """Two 141 GiB devices; the engine holds 30 GiB on the first, 24 of them in tensors, and none on the second."""
    reserved, allocated = {0: 30 * GIB, 1: 0}, {0: 24 * GIB, 1: 0}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="NVIDIA H200", total_memory=141 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: reserved[i])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: allocated[i])


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A desktop-sized page that records console errors and warnings (tests assert there are none)."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.console_problems = []
    page.on("console", lambda m: m.type in ("error", "warning") and page.console_problems.append(m.text))
    page.on("pageerror", lambda e: page.console_problems.append(str(e)))
    yield page
    context.close()
