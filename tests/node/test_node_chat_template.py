"""A daemon serving a model whose chat template refuses some messages, as Gemma's refuses a system
role (raise_exception in the template): such a job is the client's fault and is refused as one."""

from __future__ import annotations

import grpc
import pytest

from node.client import JobRefused, WorkerClient
from node.identity import Identity
from node_harness import node_toml, start_daemon

pytestmark = pytest.mark.slow

NO_SYSTEM_ROLE = """{% for message in messages %}{% if message['role'] == 'system' %}\
{{ raise_exception('System role not supported') }}{% endif %}<start_of_turn>{{ message['role'] }}
{{ message['content'] }}<end_of_turn>
{% endfor %}{% if add_generation_prompt %}<start_of_turn>model
{% endif %}"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from engine.testing import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("models") / "no-system")
    (model / "chat_template.jinja").write_text(NO_SYSTEM_ROLE)
    node = start_daemon(tmp_path_factory.mktemp("daemon"), node_toml(model))
    yield node
    assert node.stop() == 0, node.stderr_text()[-3000:]


@pytest.mark.asyncio
async def test_messages_the_template_refuses_are_refused_as_malformed_not_an_internal_error(daemon):
    async with await WorkerClient.connect(daemon.grpc, Identity.generate()) as client:
        with pytest.raises(JobRefused) as info:
            await client.run(client.sign_job(chat=[{"role": "system", "content": "be brief"}], max_new_tokens=2),
                             timeout_s=60)
        assert (info.value.code, info.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed")
        assert "chat template refuses these messages: System role not supported" in info.value.details
        result = await client.run(client.sign_job(chat=[{"role": "user", "content": "hi"}], max_new_tokens=2),
                                  timeout_s=60)
        assert result.receipt.output_tokens == 2
