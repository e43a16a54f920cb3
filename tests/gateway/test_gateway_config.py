"""The gateway's settings: defaults < --config TOML file < DSPARK_GATEWAY_* environment < the flags
given, as `dspark-node gateway` parses them, and refusals that name the value and where it came from,
before anything is written."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from node.commands import gateway as command
from node.settings import ConfigError
from node.identity import Identity

BOOTSTRAP = f"/ip4/127.0.0.1/tcp/7442/p2p/{Identity.generate().peer_id}"
FILE_KEY, ENV_KEY, FLAG_KEY = "file-key-0123456789abcdef", "env-key-0123456789abcdef", "flag-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def no_gateway_variables(monkeypatch):
    """Each test sets the DSPARK_GATEWAY_* variables it means; none leak in from the shell."""
    for name in [name for name in os.environ if name.upper().startswith("DSPARK_GATEWAY_")]:
        monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def load(*argv: str):
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    return command.load(parser.parse_args(["gateway", *argv]))


def test_file_then_environment_then_flags(tmp_path, monkeypatch):
    path = write(tmp_path, f'api_keys = ["{FILE_KEY}"]\nmax_price_per_mtok_micros = 50000\n'
                           f'bootstrap = ["{BOOTSTRAP}"]\nmdns = true\nattempts = 5\ntimeout_s = 30\n')
    from_file = load("--config", str(path))
    assert from_file.api_keys == [FILE_KEY] and from_file.max_price_per_mtok_micros == 50_000
    assert (from_file.bootstrap, from_file.mdns, from_file.attempts, from_file.timeout_s) == ([BOOTSTRAP], True, 5, 30)

    monkeypatch.setenv("DSPARK_GATEWAY_API_KEYS", f"{ENV_KEY}, {ENV_KEY}-2")
    monkeypatch.setenv("DSPARK_GATEWAY_MAX_PRICE_PER_MTOK_MICROS", "40000")
    from_env = load("--config", str(path))
    assert from_env.api_keys == [ENV_KEY, f"{ENV_KEY}-2"] and from_env.max_price_per_mtok_micros == 40_000

    from_flags = load("--config", str(path), "--api-key", FLAG_KEY, "--max-price", "30000")
    assert from_flags.api_keys == [FLAG_KEY] and from_flags.max_price_per_mtok_micros == 30_000
    # Flags not given (a list, a switch, a number) leave the file's values alone.
    assert (from_flags.bootstrap, from_flags.mdns, from_flags.attempts) == ([BOOTSTRAP], True, 5)


def test_a_json_list_of_keys_in_the_environment(monkeypatch):
    monkeypatch.setenv("DSPARK_GATEWAY_API_KEYS", f'["{ENV_KEY}", "{FLAG_KEY}"]')
    assert load("--mdns").api_keys == [ENV_KEY, FLAG_KEY]


def test_off_loopback_keys_may_come_from_the_environment(tmp_path, monkeypatch):
    path = write(tmp_path, f'listen = "0.0.0.0:8080"\nbootstrap = ["{BOOTSTRAP}"]\n')
    with pytest.raises(ConfigError, match="'0.0.0.0:8080' is not a loopback address: give --api-key"):
        load("--config", str(path))
    monkeypatch.setenv("DSPARK_GATEWAY_API_KEYS", ENV_KEY)
    assert load("--config", str(path)).api_keys == [ENV_KEY]


def test_a_key_holding_a_comma_is_refused_wherever_it_comes_from(tmp_path, monkeypatch):
    # Comma-separated in the environment it would be two keys, each a guessable half of the secret.
    comma_key = "first-half-of-a-key,second-half-of-a-key"
    with pytest.raises(ConfigError, match="--api-key: an API key must be .* without spaces or commas"):
        load("--mdns", "--api-key", comma_key)
    with pytest.raises(ConfigError, match="api_keys: an API key must be .* without spaces or commas"):
        load("--mdns", "--config", str(write(tmp_path, f'api_keys = ["{comma_key}"]')))


@pytest.mark.parametrize("text, env, message", [
    (None, {}, "config file {path} does not exist"),
    ("api_keys = [", {}, "config file {path} is not valid TOML"),
    (f'api_key = "{FILE_KEY}"', {}, "  api_key: unknown setting (in {path}); did you mean api_keys?"),
    ("zzz = 1", {}, "  zzz: unknown setting (in {path}); the top-level settings are listen, bootstrap, mdns, "
                    "data_dir, key, max_price_per_mtok_micros, max_price_per_gpu_second_micros, budget_micros, "
                    "api_keys, tls, attempts, timeout_s, idle_timeout_s"),
    ('api_keys = ["short"]', {}, "  api_keys: an API key must be at least 16 printable characters without spaces "
                                 "or commas (in {path})"),
    ("max_price_per_mtok_micros = -1", {}, "  max_price_per_mtok_micros: Input should be greater than or equal to 0 "
                                           "(in {path})"),
    ("", {"DSPARK_GATEWAY_ATTEMPTS": "lots"}, "  attempts: Input should be a valid integer, unable to parse string as "
                                              "an integer (from DSPARK_GATEWAY_ATTEMPTS)"),
    ("", {"DSPARK_GATEWAY_API_KEYS": '["unclosed"'}, "  api_keys: '[\"unclosed\"' is not a JSON list; write "
                                                     "[\"a\", \"b\"] or a,b (from DSPARK_GATEWAY_API_KEYS)"),
    ("attempts = 0", {"DSPARK_GATEWAY_ATTEMPTS": "99"}, "  attempts: Input should be less than or equal to 16 "
                                                        "(from DSPARK_GATEWAY_ATTEMPTS)"),
])
def test_a_bad_file_or_variable_exits_2_naming_it_and_writes_nothing(tmp_path, monkeypatch, capsys, text, env,
                                                                    message):
    from node.cli import main

    path = tmp_path / "gateway.toml" if text is None else write(tmp_path, text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["gateway", "--config", str(path), "--data-dir", str(tmp_path / "gw"), "--mdns"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dspark-node gateway: ") and message.format(path=path) in err, err
    assert not (tmp_path / "gw").exists()          # nothing written: no key, no store


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=oct)
def test_a_file_of_api_keys_others_may_read_is_refused_with_the_fix(tmp_path, monkeypatch, capsys, mode):
    from node.cli import main

    path = write(tmp_path, f'api_keys = ["{FILE_KEY}"]\n', mode)
    assert main(["gateway", "--config", str(path), "--data-dir", str(tmp_path / "gw"), "--mdns"]) == 2
    assert f"dspark-node gateway: config file {path} holds api_keys and has mode {mode:o}: users other than its " \
        f"owner can read them and spend through this gateway; chmod 600 {path}" in capsys.readouterr().err
    assert not (tmp_path / "gw").exists()
    monkeypatch.setenv("DSPARK_GATEWAY_API_KEYS", ENV_KEY)
    with pytest.raises(ConfigError, match="chmod 600"):     # keys given elsewhere too: the file still holds its own
        load("--mdns", "--config", str(path))
    path.chmod(0o600)
    assert load("--mdns", "--config", str(path)).api_keys == [ENV_KEY]


def test_a_readable_file_without_api_keys_is_taken(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_GATEWAY_API_KEYS", ENV_KEY)
    path = write(tmp_path, f'bootstrap = ["{BOOTSTRAP}"]\napi_keys = []\n', 0o644)
    assert load("--config", str(path)).api_keys == [ENV_KEY]


@pytest.mark.parametrize("setting, flag", [("data_dir", "--data-dir"), ("key", "--key")])
def test_an_empty_path_is_refused_wherever_it_comes_from(tmp_path, monkeypatch, capsys, setting, flag):
    # Path("") is "."; an unset variable of a deployment made the gateway write its key and receipts there.
    from node.cli import main

    with pytest.raises(ConfigError, match=rf"{setting}: is empty; give a path .* \(in "):
        load("--mdns", "--config", str(write(tmp_path, f'{setting} = ""')))
    with pytest.raises(ConfigError, match=f"{flag}: is empty"):
        load("--mdns", flag, "")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setenv(f"DSPARK_GATEWAY_{setting.upper()}", "")
    assert main(["gateway", "--mdns"]) == 2
    assert f"  {setting}: is empty; give a path (or leave the setting out for its default) (from DSPARK_GATEWAY_" \
        in capsys.readouterr().err
    assert list(workdir.iterdir()) == []           # no key, no store in the working directory


def test_a_gateway_that_cannot_join_the_network_removes_the_data_dir_it_made(tmp_path, capsys):
    from node.cli import main

    # Nothing listens on port 1: the bootstrap peer cannot be reached.
    unreachable = f"/ip4/127.0.0.1/tcp/1/p2p/{Identity.generate().peer_id}"
    fresh = tmp_path / "new" / "gw"
    assert main(["gateway", "--listen", "127.0.0.1:0", "--bootstrap", unreachable, "--data-dir", str(fresh)]) == 2
    assert "cannot join the peer network" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()       # no client key, no empty receipt store left behind
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["gateway", "--listen", "127.0.0.1:0", "--bootstrap", unreachable, "--data-dir", str(kept)]) == 2
    assert kept.is_dir()                         # a data dir that was there stays, with what was written


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "5"])
def test_an_idle_timeout_at_or_below_a_workers_heartbeat_is_refused(tmp_path, monkeypatch, value):
    # 5 s is a worker's heartbeat (node/keepalive.py): at it, a healthy worker with a queue would be given up.
    message = rf"idle_timeout_s: must be more than 5 s \(a worker sends a progress event that often .*got {value}"
    with pytest.raises(ConfigError, match=message):
        load("--mdns", "--config", str(write(tmp_path, f"idle_timeout_s = {value}")))
    monkeypatch.setenv("DSPARK_GATEWAY_IDLE_TIMEOUT_S", value)
    with pytest.raises(ConfigError, match=message):
        load("--mdns")
    monkeypatch.setenv("DSPARK_GATEWAY_IDLE_TIMEOUT_S", "5.5")
    assert load("--mdns").idle_timeout_s == 5.5
    monkeypatch.delenv("DSPARK_GATEWAY_IDLE_TIMEOUT_S")
    assert load("--mdns").idle_timeout_s == 30
