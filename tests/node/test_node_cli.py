"""`dspark-node keys new|show` as an operator runs them (a child process each)."""

from __future__ import annotations

import stat
import subprocess
import sys

from node.identity import Identity
from node_harness import ROOT


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_keys_new_then_show(tmp_path):
    path = tmp_path / "keys" / "client.key"
    made = cli("keys", "new", "--out", str(path))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    identity = Identity.load(path)
    assert f"peer_id    {identity.peer_id}" in made.stdout
    shown = cli("keys", "show", "--key", str(path))
    assert shown.returncode == 0 and shown.stdout == made.stdout
    again = cli("keys", "new", "--out", str(path))
    assert again.returncode == 1 and "already exists" in again.stderr
    assert Identity.load(path).peer_id == identity.peer_id      # not overwritten


def test_keys_show_refuses_a_readable_key(tmp_path):
    path = tmp_path / "client.key"
    Identity.generate().save(path)
    path.chmod(0o644)
    shown = cli("keys", "show", "--key", str(path))
    assert shown.returncode == 1 and "chmod 600" in shown.stderr


def test_run_refuses_a_bad_config_naming_the_field(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[admission]\nrate_per_minute = 0\n")
    ran = cli("run", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert ran.returncode == 2 and "admission.rate_per_minute" in ran.stderr
    assert not (tmp_path / "data").exists()          # nothing written before the config is valid
