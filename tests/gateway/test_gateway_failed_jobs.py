"""A worker whose engine fails every job it admits (engine.max_queue = 0 below the admission queue:
each job is admitted, then refused by the engine), cheapest on the network so it is chosen first.
Its jobs end with finish_reason "error" and a receipt of the tokens produced: that is no answer, for
`submit`, for the failover of `submit` without --node, and for the gateway."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from node.cli import main as cli_main
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
    tomls = {"failing": worker_toml(model, bootstrap.addr, 500).replace("[engine]", "[engine]\nmax_queue = 0"),
             "good": worker_toml(model, bootstrap.addr, 1_000)}
    with ThreadPoolExecutor(len(tomls)) as pool:
        futures = [pool.submit(start_daemon, tmp_path_factory.mktemp(name), toml) for name, toml in tomls.items()]
    daemons = [f.result() for f in futures if f.exception() is None]
    gateway = None
    try:
        if len(daemons) < len(tomls):
            raise next(f.exception() for f in futures if f.exception() is not None)
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
    assert code == 1 and "the worker ended the job early (error)" in err, err


def test_submit_without_node_fails_over_past_it(swarm, tmp_path, capsys):
    bootstrap, failing, good, _ = swarm
    capsys.readouterr()
    code = cli_main(["submit", "--model", good.ready["model"], "--bootstrap", bootstrap.addr, "--key",
                     str(tmp_path / "c.key"), "--prompt", "hi", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"[worker {failing.peer_id} died: the worker ended the job early (error)" in err
    assert f"verified (worker {good.peer_id})" in err


@pytest.mark.parametrize("stream", [False, True])
def test_the_gateway_answers_from_the_next_worker(swarm, stream):
    _, failing, good, gateway = swarm
    client = openai.OpenAI(base_url=gateway.base_url, api_key="unused-on-loopback", max_retries=0, timeout=120)
    request = dict(model=good.ready["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                   temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(**request, stream=True))
        (final,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        finish, extension = final.choices[0].finish_reason, final.model_extra["dspark"]
    else:
        chat = client.chat.completions.create(**request)
        finish, extension = chat.choices[0].finish_reason, chat.model_extra["dspark"]
        assert chat.usage.completion_tokens == 4
    assert finish == "length"
    assert (extension["worker"], extension["failovers"]) == (good.peer_id, 1)
