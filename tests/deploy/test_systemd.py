"""The systemd unit for a bare VM: `systemd-analyze verify` finds nothing to say, and the command
it starts is one the CLI accepts."""

from __future__ import annotations

import configparser
import shlex
import subprocess
import sys
from pathlib import Path

from deploy_helpers import DEPLOY, config_from_env, tool

from node.cli import build_parser
from node.config import load_config

UNIT = DEPLOY / "systemd" / "dspark-node.service"
INSTALLED_BINARY = "/opt/dspark-node/bin/dspark-node"


def verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    analyze = tool("systemd-analyze", "Debian package systemd")
    # verify insists the ExecStart binary exists: point it at this venv's entry point.
    assert text.count(INSTALLED_BINARY) == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(INSTALLED_BINARY, str(Path(sys.executable).parent / "dspark-node")))
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)


def test_systemd_analyze_verify_is_silent(tmp_path):
    result = verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_verify_speaks_up_on_a_broken_unit(tmp_path):
    broken = UNIT.read_text().replace("RestartSec=5", "RestartSec=soon").replace("NoNewPrivileges", "NoNewPrivilege")
    result = verify(broken, tmp_path)
    output = result.stdout + result.stderr
    assert "RestartSec" in output or "soon" in output
    assert "NoNewPrivilege" in output


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser


def test_exec_start_is_a_run_command_with_the_shipped_config():
    argv = shlex.split(unit()["Service"]["ExecStart"])
    assert argv[0] == INSTALLED_BINARY
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and str(args.data_dir) == "/var/lib/dspark-node"
    assert unit()["Service"]["StateDirectory"] == "dspark-node"  # systemd creates the data dir, 0700
    assert str(args.config) == "/etc/dspark-node/node.toml"


def test_example_config_loads(monkeypatch):
    config_from_env({}, monkeypatch)  # no DSPARK_* from the test environment
    config = load_config(DEPLOY / "systemd" / "node.toml")
    assert config.engine.device == "cuda" and config.grpc_tls
    assert config.http_listen.startswith("127.0.0.1:")  # no token needed: the dashboard stays local
