"""A worker that fails every job it admits, cheapest on the network so it is chosen first: its
ledger refuses each receipt (a trigger added once it is up stands for a full disk or a broken
file), so each job streams its tokens and then ends with finish_reason "error" and no receipt.
That is no answer, for `submit`, for the failover of `submit` without --node, and for the gateway."""

from __future__ import annotations

import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from node.cli import main as cli_main
from node.ledger_schema import LEDGER_FILE
from tests.gateway.harness import start_gateway, wait_for_workers
from tests.p2p.conftest import ready_peer, spawn_peer
from tests.p2p.test_failover_daemons import worker_toml
from node_harness import start_daemon  # noqa: E402  (on sys.path via tests.gateway.harness)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """(bootstrap, failing worker, good worker, gateway)."""
    from engine.testing import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
    bootstrap = ready_peer(spawn_peer())
    tomls = {"failing": worker_toml(model, bootstrap.addr, 500), "good": worker_toml(model, bootstrap.addr, 1_000)}
    with ThreadPoolExecutor(len(tomls)) as pool:
        futures = [pool.submit(start_daemon, tmp_path_factory.mktemp(name), toml) for name, toml in tomls.items()]
    daemons = [f.result() for f in futures if f.exception() is None]
    gateway = None
    try:
        if len(daemons) < len(tomls):
            raise next(f.exception() for f in futures if f.exception() is not None)
        with sqlite3.connect(daemons[0].data_dir / LEDGER_FILE) as ledger:
            ledger.execute("CREATE TRIGGER refuse_receipts BEFORE INSERT ON receipts "
                           "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
        gateway = start_gateway(tmp_path_factory.mktemp("gateway"), bootstrap.addr)
        wait_for_workers(gateway.base_url, daemons[0].ready["model"], 2)
        yield bootstrap, *daemons, gateway
    finally:
        if gateway is not None:
            gateway.stop(signal.SIGKILL)
        for daemon in daemons:
            daemon.stop(signal.SIGKILL)
        bootstrap.stop(signal.SIGKILL)


def test_submit_exits_1_when_the_worker_ends_the_job_with_an_error(swarm, tmp_path, capsys):
    _, failing, _, _ = swarm
    capsys.readouterr()
    code = cli_main(["submit", "--node", failing.grpc, "--key", str(tmp_path / "c.key"), "--prompt", "hi",
                     "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 1 and "the job ended (error) without a receipt" in err, err


def test_submit_without_node_fails_over_past_it(swarm, tmp_path, capsys):
    bootstrap, failing, good, _ = swarm
    capsys.readouterr()
    code = cli_main(["submit", "--model", good.ready["model"], "--bootstrap", bootstrap.addr, "--key",
                     str(tmp_path / "c.key"), "--prompt", "hi", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"[worker {failing.peer_id} died: the job ended (error) without a receipt" in err
    assert f"verified (worker {good.peer_id})" in err


def test_the_gateway_answers_from_the_next_worker(swarm):
    _, failing, good, gateway = swarm
    chat = _client(gateway).chat.completions.create(**_request(good))
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 4
    assert (chat.model_extra["dspark"]["worker"], chat.model_extra["dspark"]["failovers"]) == (good.peer_id, 1)


def test_a_stream_that_already_sent_the_failed_jobs_text_ends_in_an_error(swarm, tmp_path):
    # The failing worker's tokens reached the caller before the job failed: the stream cannot take
    # them back, so it ends with an error event instead of another worker's answer appended. A
    # gateway of its own: the module's tries the failing worker last once it has failed there.
    bootstrap, failing, good, _ = swarm
    gateway = start_gateway(tmp_path / "gateway", bootstrap.addr)
    try:
        wait_for_workers(gateway.base_url, good.ready["model"], 2)
        with pytest.raises(openai.APIError, match=f"worker {failing.peer_id} failed after"):
            list(_client(gateway).chat.completions.create(**_request(good), stream=True))
    finally:
        gateway.stop(signal.SIGKILL)


def _client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused-on-loopback", max_retries=0, timeout=120)


def _request(worker) -> dict:
    return dict(model=worker.ready["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                temperature=0)
