"""NodeConfig: defaults, TOML < DSPARK_* env < flags, and refusals that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import ConfigError, load_config
from node.identity import Identity


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_embedded_defaults_are_loopback(monkeypatch):
    monkeypatch.delenv("DSPARK_GRPC_LISTEN", raising=False)
    config = load_config()
    assert config.grpc_listen == "127.0.0.1:7440" and config.http_listen == "127.0.0.1:7441"
    assert config.p2p.listen == ["/ip4/127.0.0.1/tcp/7442"]
    assert config.grpc_tls is False            # auto: plaintext only because it is loopback
    assert config.data_dir == Path("~/.local/share/dspark-node").expanduser()


def test_precedence_file_env_flags(tmp_path, monkeypatch):
    path = write(tmp_path, 'grpc_listen = "127.0.0.1:9000"\nhttp_listen = "127.0.0.1:9001"\n'
                           '[p2p]\nmdns = true\nadvert_ttl_s = 7\n[pricing]\nper_mtok_micros = 5\n')
    monkeypatch.setenv("DSPARK_HTTP_LISTEN", "127.0.0.1:9101")
    monkeypatch.setenv("DSPARK_P2P__ADVERT_TTL_S", "9")
    config = load_config(path, {"grpc_listen": "127.0.0.1:9200", "p2p": {"listen": []}})
    assert config.grpc_listen == "127.0.0.1:9200"            # flag over file
    assert config.http_listen == "127.0.0.1:9101"            # env over file
    assert config.p2p.advert_ttl_s == 9                       # nested env over file
    assert config.p2p.mdns is True and config.p2p.listen == []   # sections merge, not replace
    assert config.pricing.per_mtok_micros == 5


@pytest.mark.parametrize("text, field", [
    ('grpc_listen = "nohost"', "grpc_listen"),
    ("[p2p]\nadvert_interval_s = 0", "p2p.advert_interval_s"),
    ('[p2p]\nlisten = ["127.0.0.1:7442"]', "p2p.listen"),
    ("[engine]\nmax_batch = 0", "engine.max_batch"),
    ('[admission]\nmode = "allowlist"', "admission"),
    ('[admission]\ndeny = ["not-a-key"]', "admission.deny"),
    ("[pricing]\nper_mtok_micros = -1", "pricing.per_mtok_micros"),
    ('[tls]\nmode = "maybe"', "tls.mode"),
    ("unknown_setting = 1", "unknown_setting"),
])
def test_bad_values_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert f"  {field}:" in str(info.value)


def test_bad_env_names_the_field(monkeypatch):
    monkeypatch.setenv("DSPARK_ADMISSION__RATE_PER_MINUTE", "lots")
    with pytest.raises(ConfigError, match="admission.rate_per_minute"):
        load_config()


def test_unreadable_files_are_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "grpc_listen = "))


def test_allow_entries_accept_peer_ids_and_hex_keys(tmp_path):
    a, b = Identity.generate(), Identity.generate()
    config = load_config(write(tmp_path, f'[admission]\nmode = "allowlist"\nallow = ["{a.peer_id}", '
                                         f'"{b.public_key.hex()}"]\n'))
    assert config.admission.allow == [a.peer_id, b.public_key.hex()]


def test_tls_modes():
    assert load_config(None, {"grpc_listen": "0.0.0.0:7440"}).grpc_tls is True
    assert load_config(None, {"grpc_listen": "0.0.0.0:7440", "tls": {"mode": "off"}}).grpc_tls is False
    assert load_config(None, {"tls": {"mode": "on"}}).grpc_tls is True


def test_run_flags_override_the_file(tmp_path):
    import argparse

    from node.commands import run

    parser = argparse.ArgumentParser()
    run.register(parser.add_subparsers())
    path = write(tmp_path, '[p2p]\nbootstrap = ["/ip4/10.0.0.1/tcp/7442"]\nmdns = true\n')
    args = parser.parse_args(["run", "--config", str(path), "--data-dir", str(tmp_path / "d"), "--grpc-listen",
                              "127.0.0.1:0", "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap",
                              "/ip4/127.0.0.2/tcp/1", "/ip4/127.0.0.3/tcp/1"])
    config = load_config(args.config, run.overrides(args))
    assert config.data_dir == tmp_path / "d" and config.grpc_listen == "127.0.0.1:0"
    assert config.p2p.listen == ["/ip4/127.0.0.1/tcp/0"]
    assert config.p2p.bootstrap == ["/ip4/127.0.0.2/tcp/1", "/ip4/127.0.0.3/tcp/1"] and config.p2p.mdns is True
    no_p2p = parser.parse_args(["run", "--p2p-listen", ""])
    assert load_config(None, run.overrides(no_p2p)).p2p.listen == []
