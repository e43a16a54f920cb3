"""NodeConfig: defaults, TOML < DSPARK_* env < flags, and refusals that name the field."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from dspark.v1.advert_pb2 import GpuInfo
from engine.api import EngineInfo, RequestStats
from engine.config import EMBEDDED_MODEL
from node.capacity import CapacityTracker
from node.config import EMBEDDED_MODEL_ID, load_config
from node.events import JobFinished, NodeDraining
from node.identity import Identity
from node.settings import ConfigError

PEER = Identity.generate().peer_id   # bootstrap addresses end in /p2p/<peer id>
ADDR_1, ADDR_2, ADDR_3 = (f"/ip4/127.0.0.{i}/tcp/1/p2p/{PEER}" for i in (1, 2, 3))


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
    ('grpc_listen = "127.0.0.1:\u00b2"', "grpc_listen"),              # a digit to str.isdigit, not to int()
    ('http_listen = "127.0.0.1:\u0663"', "http_listen"),              # Arabic-Indic 3, which int() reads as 3
    ("[p2p]\nadvert_interval_s = 0", "p2p.advert_interval_s"),
    ('[p2p]\nlisten = ["127.0.0.1:7442"]', "p2p.listen"),
    ('[p2p]\nlisten = ["/ip4/127.0.0.1/tpc/7442"]', "p2p.listen"),
    ('[p2p]\nlisten = [""]', "p2p.listen"),                          # not "no peer network": listen = []
    ('[p2p]\nbootstrap = ["/ip4/127.0.0.1/tcp/7442"]', "p2p.bootstrap"),            # no /p2p/<peer id>
    ('[p2p]\nbootstrap = ["/ip4/127.0.0.1/tcp/7442/p2p/12D3KooWnot"]', "p2p.bootstrap"),
    ("[engine]\nmax_batch = 0", "engine.max_batch"),
    ("[engine]\nthreads = 100000", "engine.threads"),
    ('[admission]\nmode = "allowlist"', "admission"),
    ('[admission]\ndeny = ["not-a-key"]', "admission.deny"),
    ("[pricing]\nper_mtok_micros = -1", "pricing.per_mtok_micros"),
    ("[pricing]\nper_mtok_micros = 18446744073709551616", "pricing.per_mtok_micros"),     # 2^64: no uint64 holds it
    ("[pricing]\nper_gpu_second_micros = 9223372036854775808", "pricing.per_gpu_second_micros"),
    (f'[pricing]\nper_model = {{ "{EMBEDDED_MODEL}" = 9223372036854775808 }}', f"pricing.per_model.{EMBEDDED_MODEL}"),
    ('[tls]\nmode = "maybe"', "tls.mode"),
    ("unknown_setting = 1", "unknown_setting"),
    ("heartbeat_s = 0", "heartbeat_s"),
    ("heartbeat_s = nan", "heartbeat_s"),
    ("heartbeat_s = 6", "heartbeat_s"),         # above the protocol's HEARTBEAT_S: clients would give up on it
])
def test_bad_values_name_the_field(tmp_path, text, field):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert f"  {field}:" in str(info.value)


def test_a_refusal_says_where_the_value_came_from(tmp_path, monkeypatch):
    path = write(tmp_path, "[p2p]\nadvert_interval_s = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"  p2p.advert_interval_s: Input should be greater than 0 (in {path})" in str(info.value)
    monkeypatch.setenv("DSPARK_P2P__ADVERT_INTERVAL_S", "-1")       # over the file's value
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "  p2p.advert_interval_s: Input should be greater than 0 (from DSPARK_P2P__ADVERT_INTERVAL_S)" \
        in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(path, {"p2p": {"advert_interval_s": 0}})          # over both
    assert "  p2p.advert_interval_s: Input should be greater than 0 (from a flag)" in str(info.value)


def test_an_unknown_setting_is_named_as_such_with_the_name_it_was_likely_meant_as(tmp_path, monkeypatch):
    path = write(tmp_path, "[engine]\nmax_bach = 4\n[admission]\nquota = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"  engine.max_bach: unknown setting (in {path}); did you mean max_batch?" in str(info.value)
    # Nothing like "quota" in a short section: its names, to choose from.
    assert (f"  admission.quota: unknown setting (in {path}); the settings of [admission] are mode, allow, deny, "
            "rate_per_minute, address_rate_per_minute, max_concurrent_per_client, max_concurrent_per_address, "
            "max_queue, clock_skew_s, grace_s") in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "gprc_listen = '127.0.0.1:7440'\n[engine]\nzzz = 1\n"))
    assert "  gprc_listen: unknown setting (in " in str(info.value) and "did you mean grpc_listen?" in str(info.value)
    # Too many settings in [engine] (19) to list: the line ends where the value came from.
    assert f"  engine.zzz: unknown setting (in {tmp_path / 'node.toml'})" in str(info.value).splitlines()
    monkeypatch.setenv("DSPARK_ENGINE__MAX_BACH", "4")
    with pytest.raises(ConfigError) as info:
        load_config()
    assert "  engine.max_bach: unknown setting (from DSPARK_ENGINE__MAX_BACH); did you mean max_batch?" \
        in str(info.value)


def test_bad_env_names_the_field(monkeypatch):
    monkeypatch.setenv("DSPARK_ADMISSION__RATE_PER_MINUTE", "lots")
    with pytest.raises(ConfigError, match="admission.rate_per_minute"):
        load_config()


def test_unreadable_files_are_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "grpc_listen = "))
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[dashboard]\ntoken = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{latin1} is not valid TOML: byte 0xe9 at offset 24 is not UTF-8"):
        load_config(latin1)


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
    path = write(tmp_path, f'[p2p]\nbootstrap = ["{ADDR_1}"]\nmdns = true\n')
    args = parser.parse_args(["run", "--config", str(path), "--data-dir", str(tmp_path / "d"), "--grpc-listen",
                              "127.0.0.1:0", "--p2p-listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap",
                              ADDR_2, "--bootstrap", ADDR_3])
    config = load_config(args.config, run.overrides(args))
    assert config.data_dir == tmp_path / "d" and config.grpc_listen == "127.0.0.1:0"
    assert config.p2p.listen == ["/ip4/127.0.0.1/tcp/0"]
    assert config.p2p.bootstrap == [ADDR_2, ADDR_3] and config.p2p.mdns is True
    no_p2p = parser.parse_args(["run", "--p2p-listen", ""])
    assert load_config(None, run.overrides(no_p2p)).p2p.listen == []


def test_run_bootstrap_is_repeatable_like_the_other_commands():
    import argparse

    from node.commands import run

    parser = argparse.ArgumentParser()
    run.register(parser.add_subparsers())
    args = parser.parse_args(["run", "--bootstrap", ADDR_2, "--bootstrap", ADDR_3])
    assert load_config(None, run.overrides(args)).p2p.bootstrap == [ADDR_2, ADDR_3]


@pytest.mark.parametrize("value, expected", [
    (ADDR_1, [ADDR_1]),
    (f"{ADDR_1}, {ADDR_2}", [ADDR_1, ADDR_2]),
    (f'["{ADDR_1}"]', [ADDR_1]),
])
def test_list_variables_take_json_or_commas(monkeypatch, value, expected):
    monkeypatch.setenv("DSPARK_P2P__BOOTSTRAP", value)
    assert load_config().p2p.bootstrap == expected


def test_empty_listen_variable_turns_the_peer_network_off(monkeypatch):
    monkeypatch.setenv("DSPARK_P2P__LISTEN", "")
    assert load_config().p2p.listen == []


def test_list_variable_still_checks_its_items(monkeypatch):
    monkeypatch.setenv("DSPARK_ADMISSION__DENY", f"{Identity.generate().peer_id},not-a-key")
    with pytest.raises(ConfigError, match=r"admission\.deny: .*'not-a-key'"):
        load_config()
    monkeypatch.setenv("DSPARK_ADMISSION__DENY", '["unclosed"')
    with pytest.raises(ConfigError, match=r"admission\.deny: .*not a JSON list"):
        load_config()


def test_unparsable_table_variable_is_named(monkeypatch):
    monkeypatch.setenv("DSPARK_PRICING__PER_MODEL", "smollm2-135m-instruct=5")
    with pytest.raises(ConfigError, match=r"cannot parse DSPARK_PRICING__PER_MODEL: .*is JSON"):
        load_config()


def test_config_path_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_price_given_under_the_alias_is_the_served_models_price(tmp_path):
    config = load_config(write(tmp_path, f'[pricing]\nper_model = {{ "{EMBEDDED_MODEL}" = 5000000 }}\n'))
    assert config.pricing.price_for(EMBEDDED_MODEL_ID) == 5_000_000
    assert config.pricing.price_for(EMBEDDED_MODEL) == 5_000_000
    info = EngineInfo(model_id=EMBEDDED_MODEL_ID, model_digest=bytes(32), method="ar", drafter_id="",
                      drafter_digest=b"", device="cpu", dtype="float32", max_context=64, max_batch=1, block_size=0)
    load = SimpleNamespace(free_slots=1, queue_depth=0)
    advert = CapacityTracker(config, Identity.generate().peer_id, info, GpuInfo(), load)()
    assert advert.price_per_mtok_micros == 5_000_000 and advert.models[0].id == EMBEDDED_MODEL_ID


def test_a_draining_node_advertises_so_with_no_free_slot():
    """From SIGTERM on, its adverts (gossip and GetCapacity alike) tell clients to choose another."""
    info = EngineInfo(model_id=EMBEDDED_MODEL_ID, model_digest=bytes(32), method="ar", drafter_id="",
                      drafter_digest=b"", device="cpu", dtype="float32", max_context=64, max_batch=2, block_size=0)
    tracker = CapacityTracker(load_config(None), Identity.generate().peer_id, info, GpuInfo(),
                              SimpleNamespace(free_slots=2, queue_depth=0))
    assert (tracker().draining, tracker().free_slots) == (False, 2)
    tracker.observe(NodeDraining(grace_seconds=10))
    assert (tracker().draining, tracker().free_slots) == (True, 0)


def test_advertised_speed_is_output_tokens_per_billed_gpu_second():
    """Clients turn a time price into a token price with the advertised speed (node/p2p/selection.py),
    so it is counted per GPU-second billed: two jobs of 100 tokens that shared 1 s of passes made 200
    tokens in 1 s of device time, though each user waited 1 s for 100."""
    info = EngineInfo(model_id=EMBEDDED_MODEL_ID, model_digest=bytes(32), method="ar", drafter_id="",
                      drafter_digest=b"", device="cpu", dtype="float32", max_context=64, max_batch=2, block_size=0)
    tracker = CapacityTracker(load_config(), Identity.generate().peer_id, info, GpuInfo(),
                              SimpleNamespace(free_slots=2, queue_depth=0))
    assert tracker().tokens_per_second == 0.0
    for job in ("a", "b"):
        stats = RequestStats(output_tokens=100, prefill_seconds=0.1, decode_seconds=0.9, device_seconds=0.5)
        tracker.observe(JobFinished(job_id=job, client="", outcome="completed", stats=stats, amount_micros=0,
                                    receipt_sequence=1, time_to_first_token=0.1))
    assert tracker().tokens_per_second == pytest.approx(200.0)


def test_price_for_a_model_not_served_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="price for 'smollm2'.*serves 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        load_config(write(tmp_path, '[pricing]\nper_model = { "smollm2" = 5 }\n'))
    both = f'[pricing]\nper_model = {{ "{EMBEDDED_MODEL}" = 5, "{EMBEDDED_MODEL_ID}" = 6 }}\n'
    with pytest.raises(ConfigError, match="name the same model"):
        load_config(write(tmp_path, both))
    mine = '[engine]\nmodel = "/models/mine"\n[pricing]\nper_model = { "/models/mine" = 7 }'
    served = load_config(write(tmp_path, mine))
    assert served.pricing.price_for("/models/mine") == 7


def test_an_admission_queue_past_the_engines_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"admission.max_queue \(64\) exceeds engine.max_queue \(8\)"):
        load_config(write(tmp_path, "[engine]\nmax_queue = 8\n"))
    config = load_config(write(tmp_path, "[engine]\nmax_queue = 8\n[admission]\nmax_queue = 8\n"))
    assert (config.admission.max_queue, config.engine.max_queue) == (8, 8)


@pytest.mark.parametrize("token", ["abc+defghijklmnopq", "abc;defghijklmnopq", "abc defghijklmnopq",
                                   "abc%2Bdefghijklmno", "short-token"])
def test_dashboard_token_must_be_url_and_cookie_safe(monkeypatch, token):
    monkeypatch.setenv("DSPARK_DASHBOARD__TOKEN", token)
    with pytest.raises(ConfigError, match=r"dashboard\.token: .*A-Z a-z 0-9 \. _ ~ -"):
        load_config()


def test_dashboard_token_of_safe_characters_is_kept(monkeypatch):
    monkeypatch.setenv("DSPARK_DASHBOARD__TOKEN", "Az09._~-Az09._~-")
    assert load_config().dashboard.token == "Az09._~-Az09._~-"


def test_a_misspelt_top_level_variable_is_named_with_the_one_meant(tmp_path, monkeypatch, caplog):
    """pydantic-settings passes over a variable it has no field for: a typo left the default in force."""
    monkeypatch.setenv("DSPARK_GRPC_LISTN", "0.0.0.0:7440")
    monkeypatch.setenv("DSPARK_ENGNE__MAX_BATCH", "4")
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))                  # the model cache's, not a setting
    monkeypatch.setenv("DSPARK_GATEWAY_API_KEYS", "sk-0123456789abcdef")   # the gateway's
    with caplog.at_level(logging.WARNING, logger="node.settings"):
        config = load_config()
    assert config.grpc_listen == "127.0.0.1:7440"        # ignored, as before; now said
    assert sorted(r.getMessage() for r in caplog.records) == [
        "DSPARK_ENGNE__MAX_BATCH is not a setting, and is ignored; did you mean DSPARK_ENGINE__MAX_BATCH?",
        "DSPARK_GRPC_LISTN is not a setting, and is ignored; did you mean DSPARK_GRPC_LISTEN?"]
