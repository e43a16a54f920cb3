"""`dspark-node keys new|show` as an operator runs them (a child process each)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from engine.config import EMBEDDED_MODEL
from node.config import EMBEDDED_MODEL_ID
from node.identity import Identity
from node.ledger import Ledger
from node_harness import ROOT, node_toml, start_daemon


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


@pytest.mark.parametrize("make, words", [
    (lambda path: path.write_bytes(bytes(range(128, 256))), "is not a dspark-node key file (not text)"),
    (lambda path: path.mkdir(), "cannot be read: Is a directory"),
    (lambda path: path.write_text("dspark-node ed25519 key v1\nAAAA\n"), "is corrupt (an Ed25519 seed is 32 bytes"),
], ids=["binary", "directory", "short-seed"])
def test_a_key_file_that_is_not_a_key_is_refused_by_name(tmp_path, make, words):
    key = tmp_path / "node.key"
    make(key)
    key.chmod(0o700 if key.is_dir() else 0o600)
    refused_clearly(cli("keys", "show", "--key", str(key)), 1, f"{key} ", words)
    refused_clearly(cli("run", "--data-dir", str(tmp_path), *NO_PORTS), 2, f"{key} ", words)


def test_run_where_the_key_cannot_be_written_is_refused_by_name(tmp_path):
    key = tmp_path / "node.key"
    key.symlink_to(tmp_path / "absent" / "node.key")      # dangling: no key there, and none can be made
    refused_clearly(cli("run", "--data-dir", str(tmp_path), *NO_PORTS), 2, f"key file {key} cannot be written")


def test_run_refuses_a_bad_config_naming_the_field(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[admission]\nrate_per_minute = 0\n")
    ran = cli("run", "--config", str(config), "--data-dir", str(tmp_path / "data"))
    assert ran.returncode == 2 and "admission.rate_per_minute" in ran.stderr
    assert not (tmp_path / "data").exists()          # nothing written before the config is valid


def test_run_names_the_flag_of_a_bad_value(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('grpc_listen = "127.0.0.1:0"\n')
    ran = cli("run", "--config", str(config), "--data-dir", str(tmp_path / "data"), "--http-listen", "nowhere",
              "--bootstrap", "/ip4/127.0.0.1/tcp/7442/p2p/not-a-peer-id")
    refused_clearly(ran, 2, "--http-listen: ", "--bootstrap: ")
    assert "(from a flag)" not in ran.stderr and not (tmp_path / "data").exists()


def refused_clearly(ran: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert ran.returncode == code, (ran.returncode, ran.stderr)
    assert "Traceback" not in ran.stderr, ran.stderr
    for word in words:
        assert word in ran.stderr + ran.stdout, (word, ran.stderr, ran.stdout)


# No port of the default set, so a node that other tests run on this machine does not interfere.
NO_PORTS = ("--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--p2p-listen", "")


def test_run_and_doctor_refuse_a_config_path_that_is_a_directory(tmp_path):
    refused_clearly(cli("run", "--config", str(tmp_path), *NO_PORTS), 2, "is a directory")
    refused_clearly(cli("doctor", "--config", str(tmp_path)), 1, "is a directory")


@pytest.mark.parametrize("command", ["run", "doctor"])
def test_an_empty_data_dir_is_refused_not_taken_as_the_current_directory(tmp_path, command):
    ports = NO_PORTS if command == "run" else ()
    for given in (("--data-dir", ""), ()):
        ran = subprocess.run([sys.executable, "-m", "node.cli", command, *given, *ports], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "DSPARK_DATA_DIR": ""})
        refused_clearly(ran, 2 if command == "run" else 1, "--data-dir: is empty" if given else
                        "data_dir: is empty; give the directory for the node's key and ledger (from DSPARK_DATA_DIR)")
    assert list(tmp_path.iterdir()) == []            # no key, no ledger where the node was started from


def test_run_where_the_key_of_a_ledger_is_missing_makes_no_new_key(tmp_path):
    Ledger.open(tmp_path / "ledger.sqlite3", Identity.generate()).close()     # a node ran here; its key is gone
    ran = cli("run", "--data-dir", str(tmp_path), *NO_PORTS)
    refused_clearly(ran, 2, f"{tmp_path / 'node.key'} is missing, but {tmp_path / 'ledger.sqlite3'} holds",
                    "restore the key from backup")
    assert not (tmp_path / "node.key").exists()


def test_run_refuses_a_data_dir_that_is_a_file(tmp_path):
    data = tmp_path / "data"
    data.write_text("")
    refused_clearly(cli("run", "--data-dir", str(data), *NO_PORTS), 2, f"data_dir {data} is a file")


def _cert_is_a_directory(tls):
    (tls / "cert.pem").mkdir(parents=True)
    (tls / "key.pem").write_text("")


@pytest.mark.parametrize("blocker, make", [("tls", lambda tls: tls.write_text("")),
                                           ("tls/cert.pem", _cert_is_a_directory)], ids=["tls-file", "cert-dir"])
def test_run_refuses_tls_material_it_cannot_use_naming_the_path(tmp_path, blocker, make):
    make(tmp_path / "tls")
    ran = cli("run", "--data-dir", str(tmp_path), *NO_PORTS, "--grpc-listen", "0.0.0.0:0")   # TLS: not loopback
    refused_clearly(ran, 2, f"cannot use {tmp_path / blocker} (", f"certificate in the directory {tmp_path / 'tls'}")


def test_run_refuses_a_max_context_past_the_models_positions(tmp_path, tiny_model):
    config = tmp_path / "node.toml"       # the tiny model has rotary tables for 4096 positions
    config.write_text(f'[engine]\nmodel = "{tiny_model}"\nmethod = "ar"\nmax_batch = 1\nmax_context = 4097\n')
    ran = cli("run", "--config", str(config), "--data-dir", str(tmp_path / "data"), *NO_PORTS)
    refused_clearly(ran, 2, "max_context 4097 is more than the 4096 positions", "set max_context to at most 4096")
    assert not (tmp_path / "data").exists()


def test_a_start_refused_at_the_model_leaves_no_data_dir_behind(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(f'[engine]\nmodel = "{tmp_path / "no-such-model"}"\n')
    ran = cli("run", "--config", str(config), "--data-dir", str(tmp_path / "new" / "data"), *NO_PORTS)
    refused_clearly(ran, 2, "no-such-model' not found")
    assert not (tmp_path / "new").exists()                  # nor the key and ledger the start wrote in it
    kept = tmp_path / "kept"
    kept.mkdir()
    ran = cli("run", "--config", str(config), "--data-dir", str(kept), *NO_PORTS)
    refused_clearly(ran, 2, "no-such-model' not found")
    assert kept.is_dir()                                     # a data dir that was there is not removed


def test_a_second_node_on_a_running_nodes_data_dir_is_refused(tmp_path, tiny_model):
    first = start_daemon(tmp_path / "data", node_toml(tiny_model))
    try:
        started = time.monotonic()
        ran = cli("run", "--config", str(tmp_path / "data" / "node.toml"), "--data-dir", str(tmp_path / "data"))
        refused_clearly(ran, 2, f"data_dir {tmp_path / 'data'} is in use by another running node")
        assert time.monotonic() - started < 60          # refused before its model loads
        assert first.proc.poll() is None
    finally:
        assert first.stop() == 0


def test_run_refuses_a_taken_port_before_loading_anything(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        ran = cli("run", "--data-dir", str(tmp_path / "data"), *NO_PORTS, "--grpc-listen", f"127.0.0.1:{port}")
    refused_clearly(ran, 2, f"grpc_listen 127.0.0.1:{port}", "change grpc_listen")
    assert not (tmp_path / "data").exists()              # the data dir this start made is removed again
    assert time.monotonic() - started < 30


def test_run_refuses_an_address_not_on_this_machine_without_blaming_another_program(tmp_path):
    ran = cli("run", "--data-dir", str(tmp_path / "data"), *NO_PORTS, "--http-listen", "192.0.2.1:7441")
    refused_clearly(ran, 2, "http_listen 192.0.2.1:7441: cannot listen there (", "; change http_listen")
    assert "stop the program" not in ran.stderr


def test_run_refuses_two_settings_naming_one_port(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ran = cli("run", "--data-dir", str(tmp_path / "data"), *NO_PORTS, "--grpc-listen", f"127.0.0.1:{port}",
              "--http-listen", f"127.0.0.1:{port}")
    refused_clearly(ran, 2, f"http_listen 127.0.0.1:{port}")


def test_run_names_an_environment_variable_it_cannot_parse(tmp_path):
    ran = subprocess.run([sys.executable, "-m", "node.cli", "run", "--data-dir", str(tmp_path / "d"), *NO_PORTS],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DSPARK_PRICING__PER_MODEL": "smollm2-135m-instruct=5"})
    refused_clearly(ran, 2, "DSPARK_PRICING__PER_MODEL", "JSON")


@pytest.mark.parametrize("flags, words", [
    (("--seed", "-1"), ("--seed must be from 0",)),
    (("--max-price", "-5"), ("--max-price must be from 0",)),
    (("--max-price-gpu-second", "-1"), ("--max-price-gpu-second must be from 0 to 2^64-1", "got -1")),
    (("--max-price-gpu-second", str(2**64)), ("--max-price-gpu-second must be from 0",)),
    (("--temperature", "nan"), ("--temperature must be from 0 to 100",)),
    (("--timeout", "0"), ("--timeout must be a positive",)),
    (("--timeout", "inf"), ("--timeout must be a positive number of seconds up to 86400, got inf",)),
    (("--timeout", "1e12"), ("--timeout must be a positive",)),     # past grpc's deadline range
    (("--idle-timeout", "0"), ("--idle-timeout must be more than 5 s", "got 0.0")),
    (("--idle-timeout", "5"), ("--idle-timeout must be more than 5 s (a worker sends a progress event",)),
    (("--idle-timeout", "nan"), ("--idle-timeout must be more than 5 s", "got nan")),
    (("--max-new-tokens", str(2**32)), ("--max-new-tokens must be from 1 to 2^32-1",)),   # a uint32 field
    (("--attempts", "0"), ("--attempts must be at least 1",)),
    (("--prompt", "a\udcff\udcfeb"), ("--prompt is not valid UTF-8",)),
])
def test_submit_refuses_bad_arguments_before_making_a_key(tmp_path, flags, words):
    key = tmp_path / "client.key"
    ran = cli("submit", "--node", "127.0.0.1:9", "--key", str(key), "--prompt", "hi", *flags)
    refused_clearly(ran, 2, *words)
    assert not key.exists()


@pytest.mark.parametrize("flags, words", [
    ((), ("give --node HOST:PORT, or --model MODEL",)),
    (("--model", EMBEDDED_MODEL), ("give --bootstrap MULTIADDR (or --mdns)",)),
])
def test_submit_without_a_node_refuses_missing_network_flags_before_making_a_key(tmp_path, flags, words):
    key = tmp_path / "client.key"
    refused_clearly(cli("submit", "--key", str(key), "--prompt", "hi", *flags), 2, *words)
    assert not key.exists()


@pytest.mark.parametrize("where, words", [
    ("file/receipt.json", ("--receipt-out", "file/receipt.json: cannot write there (Not a directory)")),
    ("missing/receipt.json", ("missing/receipt.json: cannot write there (No such file or directory)",)),
    (".", ("--receipt-out", ": is a directory")),
])
def test_submit_refuses_a_receipt_out_it_cannot_write_before_making_a_key(tmp_path, where, words):
    """Found before the job is paid for, not once its receipt has nowhere to go."""
    (tmp_path / "file").write_text("")
    key = tmp_path / "client.key"
    ran = cli("submit", "--node", "127.0.0.1:9", "--key", str(key), "--prompt", "hi",
              "--receipt-out", str(tmp_path / where))
    refused_clearly(ran, 2, *words)
    assert not key.exists()


@pytest.mark.parametrize("argv", [
    ["--log-level", "DEBUG", "keys", "show"],
    ["keys", "show", "--log-level", "DEBUG"],
    ["receipts", "verify", "--log-level", "DEBUG"],       # a subcommand's own action
    ["--log-level", "ERROR", "submit", "--prompt", "hi", "--log-level", "DEBUG"],     # the last one given
])
def test_the_log_level_is_taken_before_or_after_the_command(argv):
    from node.cli import build_parser

    assert build_parser(argv).parse_args(argv).log_level == "DEBUG"


def test_a_command_given_no_log_level_keeps_the_default():
    from node.cli import build_parser

    assert build_parser(["keys", "show"]).parse_args(["keys", "show"]).log_level == "WARNING"


def test_submit_takes_the_log_level_after_its_flags(tmp_path):
    """It was refused: `unrecognized arguments: --log-level DEBUG`."""
    ran = cli("submit", "--node", "127.0.0.1:9", "--key", str(tmp_path / "client.key"), "--prompt", "hi",
              "--timeout", "5", "--log-level", "DEBUG")
    refused_clearly(ran, 1, "cannot reach the worker at 127.0.0.1:9")
    assert " DEBUG " in ran.stderr      # a log line at that level


@pytest.mark.parametrize("command, flags, words", [
    ("generate", ("--prompt", "hi", "--block-size", "99"), ("error: --block-size: ", "less than or equal to 32")),
    ("bench", ("--block-size", "0"), ("error: --block-size: ", "greater than or equal to 1")),
    ("train-drafter", ("--steps", "0"), ("error: --steps: ", "greater than or equal to 1")),
])
def test_engine_commands_name_the_flag_of_a_bad_value(tmp_path, command, flags, words):
    """Not pydantic's dump of the settings class the flags were gathered into."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["hi"]}\n')
    where = {"bench": ("--prompts", str(prompts), "--limit", "1"), "train-drafter": ("--out", str(tmp_path / "d"))}
    ran = cli(command, *where.get(command, ()), *flags)
    refused_clearly(ran, 2, *words)
    assert "validation error for" not in ran.stderr and "errors.pydantic.dev" not in ran.stderr


def test_keys_new_where_no_file_can_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    refused_clearly(cli("keys", "new", "--out", str(blocker / "x.key")), 1, "cannot write")


@pytest.mark.parametrize("args", [("health", "--grpc", "nohost"), ("doctor", "--peer", "nohost")])
def test_endpoint_flags_say_the_form_they_expect(args):
    ran = cli(*args)
    refused_clearly(ran, 2, "'nohost' is not HOST:PORT", "127.0.0.1:7440")
    assert "parse_endpoint" not in ran.stderr


@pytest.mark.parametrize("wait", ["-1", "nan", "inf"])
def test_peers_refuses_a_wait_that_is_no_duration_before_joining(wait):
    refused_clearly(cli("peers", "--wait", wait), 2, f"--wait must be from 0 to 3600 seconds, got {float(wait)}")


@pytest.mark.parametrize("command", ["peers", "submit"])
def test_model_flags_take_the_embedded_alias(command):
    from node.cli import build_parser

    argv = [command, "--model", EMBEDDED_MODEL] + (["--prompt", "hi"] if command == "submit" else [])
    assert build_parser(argv).parse_args(argv).model == EMBEDDED_MODEL_ID


def test_peers_lists_each_workers_gpu_in_aligned_columns():
    from dspark.v1.advert_pb2 import CapacityAdvert, GpuInfo, ModelOffer
    from dspark.v1.envelope_pb2 import Envelope

    from node.commands.peers import describe, table
    from node.p2p.adverts import LiveAdvert

    def row(gpu: GpuInfo, draining: bool = False) -> dict:
        advert = CapacityAdvert(peer_id=Identity.generate().peer_id, grpc_endpoint="203.0.113.5:7440", gpu=gpu,
                                models=[ModelOffer(id=EMBEDDED_MODEL_ID)], price_per_mtok_micros=100_000,
                                free_slots=3, queue_depth=1, tokens_per_second=41.25, issued_at_ms=1_000,
                                draining=draining)
        return describe(LiveAdvert(advert, Envelope(), expires_at_ms=31_000), 2_000)

    header, h200, cpu, leaving = table([row(GpuInfo(name="NVIDIA H200", count=2, memory_bytes=141 << 30)),
                                        row(GpuInfo(name="cpu")), row(GpuInfo(name="cpu"), draining=True)])
    assert header.split() == ["PEER", "ID", "GRPC", "GPU", "MODELS", "PRICE/MTOK", "FREE", "QUEUE", "TOK/S"]
    assert "2x NVIDIA H200" in h200 and " cpu " in cpu and " 0x " not in cpu
    for line in (h200, cpu, leaving):     # each value under its heading, the model id included
        assert line.index(EMBEDDED_MODEL_ID) == header.index("MODELS")
        assert line.rstrip().endswith("41.2") and len(line) == len(header)
    free = header.index("FREE") + len("FREE")
    assert cpu[free - 5:free] == "    3" and leaving[free - 5:free] == "drain"


def test_peers_writes_a_peers_control_characters_as_escapes():
    from dspark.v1.advert_pb2 import CapacityAdvert, GpuInfo, ModelOffer
    from dspark.v1.envelope_pb2 import Envelope

    from node.commands.peers import describe, table
    from node.p2p.adverts import LiveAdvert

    # An advert's strings are the peer's to choose: raw, these cleared the operator's screen, coloured
    # it, and printed a second, forged worker row.
    advert = CapacityAdvert(peer_id=Identity.generate().peer_id, grpc_endpoint="\x1b[2Jhost:5",
                            gpu=GpuInfo(name="\x1b]0;owned\x07gpu", count=1),
                            models=[ModelOffer(id="m\x1b[31m\n12D3KooWForged 1.2.3.4:1 cheap\u202e")],
                            issued_at_ms=1_000)
    header, line = table([describe(LiveAdvert(advert, Envelope(), expires_at_ms=9_000), 2_000)])
    assert all(c.isprintable() for c in line)
    assert "\\x1b[2Jhost:5" in line and "1x \\x1b]0;owned\\x07gpu" in line
    assert "m\\x1b[31m\\n12D3KooWForged 1.2.3.4:1 cheap\\u202e" in line
