"""What a client can make a real daemon do with jobs it is allowed to send: the node's answers stay
consistent with themselves, and nothing the client does ends up as a traceback in the node's log."""

from __future__ import annotations

import pytest

from node.client import WorkerClient
from node.identity import Identity
from node_harness import node_toml, start_daemon

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tiny_model, tmp_path_factory):
    node = start_daemon(tmp_path_factory.mktemp("hostile"), node_toml(tiny_model))
    yield node
    assert node.stop() == 0, node.stderr_text()[-3000:]


async def connect(daemon) -> WorkerClient:
    return await WorkerClient.connect(daemon.grpc, Identity.generate(), peer_id=daemon.peer_id)


@pytest.mark.asyncio
async def test_a_stop_string_longer_than_the_output_so_far_is_never_streamed(daemon):
    """The engine holds back the last len(stop) - 1 characters while a stop string may still complete.
    Cut as text[:len(text) - hold], a text shorter than that counted from its end: with stop ':::::'
    after 'Count:' the client was streamed '::', then got the result '' (the stop string began there)."""
    async with await connect(daemon) as client:
        plain = await client.run(client.sign_job(text="Count:", max_new_tokens=48), timeout_s=60)
        stop = plain.text[:24]
        assert len(stop) == 24, plain.text
        streamed: list[str] = []
        result = await client.run(client.sign_job(text="Count:", max_new_tokens=48, stop=[stop]),
                                  on_text=streamed.append, timeout_s=60)
    assert result.finish_reason == "stop"
    assert "".join(streamed) == result.text == plain.text[:plain.text.find(stop)]
