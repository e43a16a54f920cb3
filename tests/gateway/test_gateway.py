"""The gateway end to end: real worker daemons on a loopback peer network, a real gateway process,
and the official `openai` SDK as the client. Tests run in file order; the last ones kill workers."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from node.cli import main as cli_main
from node.identity import Identity
from node.ledger import Ledger
from node.gateway.receipt_store import STORE_FILE, ReceiptStore
from tests.gateway.conftest import API_KEY
from tests.gateway.harness import wait_for_workers
from tests.p2p.test_failover_daemons import TIME_PRICE
from node_harness import start_daemon  # noqa: E402  (on sys.path via tests.gateway.harness)

pytestmark = pytest.mark.slow
PROMPT = "Write a haiku about the sea."


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def submit(network, tmp_path, *args: str, capsys) -> str:
    """The text `dspark-node submit` prints for the same job, on the worker the gateway chose."""
    capsys.readouterr()
    code = cli_main(["submit", "--node", network.cheap.grpc, "--key", str(tmp_path / "submit.key"),
                     "--prompt", PROMPT, *args])
    assert code == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_models_lists_what_workers_advertise(client, network):
    models = {m.id: m for m in client.models.list().data}
    card = models[network.model].model_extra["dspark"]
    assert card["workers"] == 2
    assert card["best_price_per_mtok_micros"] == 1_000      # the cheaper of the two workers


def test_chat_equals_submit_with_usage_and_receipt(client, network, gateway, tmp_path, capsys):
    raw = client.chat.completions.with_raw_response.create(
        model=network.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0)
    chat = raw.parse()
    assert chat.choices[0].message.content == submit(network, tmp_path, "--max-new-tokens", "8", capsys=capsys)
    extension = chat.model_extra["dspark"]
    assert raw.headers["x-dspark-worker"] == extension["worker"] == network.cheap.peer_id
    assert raw.headers["x-dspark-receipt"] == extension["receipt_digest"]
    assert float(raw.headers["x-dspark-tau"]) == pytest.approx(extension["tau"], abs=1e-4)
    # usage is the receipt's, and the receipt is kept by the gateway and countersigned at the worker
    store = ReceiptStore.open_readonly(gateway.data_dir / STORE_FILE)
    try:
        (row,) = store.find(bytes.fromhex(extension["job_id"]))
    finally:
        store.close()
    assert row.digest.hex() == extension["receipt_digest"] and row.ack_bytes
    assert (chat.usage.completion_tokens, chat.usage.prompt_tokens) == (row.output_tokens, row.receipt().prompt_tokens)
    worker = Ledger.open_readonly(network.cheap.data_dir / "ledger.sqlite3")
    try:
        (stored,) = worker.find(row.job_id)
    finally:
        worker.close()
    assert stored.ack_bytes == row.ack_bytes


def test_seeded_sampled_completion_equals_submit(client, network, tmp_path, capsys):
    completion = client.completions.create(model=network.model, prompt=PROMPT, max_tokens=8, temperature=1.0,
                                           seed=7)
    expected = submit(network, tmp_path, "--raw", "--max-new-tokens", "8", "--temperature", "1", "--seed", "7",
                      capsys=capsys)
    assert completion.choices[0].text == expected
    assert completion.usage.completion_tokens == 8 and completion.choices[0].finish_reason == "length"


def test_streams_equal_the_whole_answers(client, network):
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=network.model, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=network.model, messages=messages, max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].model_extra["dspark"]["receipt_digest"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 12

    text = client.completions.create(model=network.model, prompt=PROMPT, max_tokens=10, temperature=0)
    streamed = list(client.completions.create(model=network.model, prompt=PROMPT, max_tokens=10, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def sse_events(gateway, path: str, body: dict) -> list[str]:
    """The data of each server-sent event, checking OpenAI's framing on the way."""
    response = httpx.post(f"{gateway.base_url}/{path}", json={**body, "stream": True}, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("\n\n")
    events = response.text.removesuffix("\n\n").split("\n\n")
    assert all(event.startswith("data: ") for event in events)
    return [event.removeprefix("data: ") for event in events]


@pytest.mark.parametrize("path, body", [
    ("chat/completions", {"messages": [{"role": "user", "content": PROMPT}],
                          "stream_options": {"include_usage": True}}),
    ("completions", {"prompt": PROMPT}),
])
def test_stream_chunks_carry_finish_reason_and_logprobs_as_null_until_the_last(gateway, network, path, body):
    # OpenAI sends both in every choice of every chunk: clients that read the JSON themselves index
    # choice["finish_reason"], and the SDK's legacy CompletionChoice declares it required.
    *chunks, done = sse_events(gateway, path, {**body, "model": network.model, "max_tokens": 3, "temperature": 0})
    assert done == "[DONE]"
    choices = [chunk["choices"][0] for chunk in map(json.loads, chunks) if chunk["choices"]]
    assert [choice["finish_reason"] for choice in choices] == [None] * (len(choices) - 1) + ["length"]
    assert all(choice["logprobs"] is None for choice in choices)
    if path == "chat/completions":
        assert choices[0]["delta"] == {"role": "assistant", "content": ""} and choices[-1]["delta"] == {}
        assert all(choice["delta"].keys() == {"content"} for choice in choices[1:-1])
        assert json.loads(chunks[-1])["choices"] == [] and json.loads(chunks[-1])["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": True}, "logprobs"), ({"n": 2}, "n"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"temperature": 2.5}, "temperature"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_unsupported_or_bad_parameter_is_400_naming_it(client, network, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=network.model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, **extra)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param


def test_neutral_values_of_unsupported_parameters_are_accepted(client, network):
    chat = client.chat.completions.create(model=network.model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2, temperature=0, n=1, presence_penalty=0, logprobs=False)
    assert chat.usage.completion_tokens == 2


def test_an_assistant_message_dumped_from_a_response_goes_back_into_the_history(client, network):
    messages = [{"role": "user", "content": "hi"}]
    first = client.chat.completions.create(model=network.model, messages=messages, max_tokens=2, temperature=0)
    # model_dump() writes every field of the SDK's message type: refusal, tool_calls, audio... as null
    messages += [first.choices[0].message.model_dump(), {"role": "user", "content": "and?"}]
    again = client.chat.completions.create(model=network.model, messages=messages, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_keys_and_unknown_model(gateway, client):
    response = httpx.get(f"{gateway.base_url}/models")          # 401: no key
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    lower = httpx.get(f"{gateway.base_url}/models", headers={"Authorization": f"bearer {API_KEY}"})
    assert lower.status_code == 200          # the scheme is case-insensitive; the key is not
    with pytest.raises(openai.PermissionDeniedError):   # 403: a key the gateway does not accept
        openai.OpenAI(base_url=gateway.base_url, api_key="not-the-key-0123456789", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"


def test_bodies_that_are_not_requests(gateway):
    url, auth = f"{gateway.base_url}/chat/completions", {"Authorization": f"Bearer {API_KEY}"}
    not_json = httpx.post(url, content=b"{not json", headers=auth)
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]["message"]
    huge = httpx.post(url, content=b"x" * (5 * 1024 * 1024), headers=auth, timeout=60)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    assert httpx.post(url, json=[1, 2], headers=auth).status_code == 400
    deep = httpx.post(url, content=b"[" * 200_000, headers=auth, timeout=60)
    assert deep.status_code == 400 and "nests too deeply" in deep.json()["error"]["message"]


def test_a_client_leaving_while_it_sends_its_request_is_no_error_of_the_gateways(gateway):
    log = gateway.data_dir / "stderr.log"
    tracebacks = log.read_text().count("Traceback")
    url = httpx.URL(gateway.base_url)
    with socket.create_connection((url.host, url.port), timeout=10) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                           + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
    # The gateway's one event loop sees that connection end before it answers this request.
    assert httpx.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    time.sleep(0.2)
    assert log.read_text().count("Traceback") == tracebacks


@pytest.mark.parametrize("number, words", [
    (b"1" + b"0" * 5000, "a number of thousands of digits"), (b"NaN", "NaN is not a JSON number"),
    (b"-Infinity", "-Infinity is not a JSON number"),
])
def test_numbers_that_json_has_not_are_refused_as_not_json(gateway, number, words):
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": ' + number + b"}"
    response = httpx.post(f"{gateway.base_url}/chat/completions", content=raw,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400 and words in response.json()["error"]["message"]


def test_a_route_or_method_the_gateway_has_not_is_refused_in_openais_body(gateway, client):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    missing = httpx.get(f"{gateway.base_url}/embeddings", headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found: GET /v1/embeddings"
    wrong = httpx.get(f"{gateway.base_url}/chat/completions", headers=headers)
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as caught:      # the SDK's models.retrieve: not served here
        client.models.retrieve("m")
    assert caught.value.body["message"] == "Not Found: GET /v1/models/m"


def test_a_prompt_too_big_for_a_signed_job_is_a_400_not_a_503(client, network):
    # 3 MB: under the gateway's 4 MiB body limit, over gRPC's 2 MiB (no worker reads it: it was a 503,
    # which the SDKs retry) and the 1 MiB a signed job carries.
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=network.model, prompt="a" * 3_000_000, max_tokens=2)
    assert (caught.value.body["code"], caught.value.body["param"]) == ("context_length_exceeded", "prompt")


def test_receipts_commands_work_on_the_gateway_dir(gateway, capsys):
    capsys.readouterr()
    assert cli_main(["receipts", "verify", "--data-dir", str(gateway.data_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "receipts" in out
    checked = int(out.split()[1])
    acknowledged = int(out.rsplit(",", 1)[1].split()[0])
    assert checked == acknowledged >= 6
    assert cli_main(["receipts", "list", "--data-dir", str(gateway.data_dir), "--limit", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_budget_stops_new_requests_and_survives_a_restart(gateway_factory, network, tmp_path):
    data_dir = tmp_path / "budgeted"
    proc = gateway_factory(data_dir, "--budget", "1")
    wait_for_workers(proc.base_url, network.model, 2)
    budgeted = openai.OpenAI(base_url=proc.base_url, api_key="unused-on-loopback", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "hi"}]
    first = budgeted.chat.completions.create(model=network.model, messages=messages, max_tokens=4, temperature=0)
    assert first.model_extra["dspark"]["amount_micros"] >= 1
    with pytest.raises(openai.APIStatusError) as caught:
        budgeted.chat.completions.create(model=network.model, messages=messages, max_tokens=4)
    assert caught.value.status_code == 402 and caught.value.body["code"] == "budget_exhausted"
    proc.stop()
    again = gateway_factory(data_dir, "--budget", "1")
    wait_for_workers(again.base_url, network.model, 2)
    with pytest.raises(openai.APIStatusError) as caught:
        openai.OpenAI(base_url=again.base_url, api_key="x", max_retries=0).chat.completions.create(
            model=network.model, messages=messages, max_tokens=4)
    assert caught.value.status_code == 402


@pytest.fixture(scope="module")
def capped_gateway(gateway_factory, network, tmp_path_factory):
    """A gateway without keys whose GPU-second cap leaves it the dear worker only (the cheap one prices
    time)."""
    proc = gateway_factory(tmp_path_factory.mktemp("capped"), "--max-price-gpu-second", str(TIME_PRICE - 1))
    wait_for_workers(proc.base_url, network.model, 2)
    return proc


def test_a_gpu_second_cap_sends_jobs_past_a_worker_whose_time_price_is_above_it(capped_gateway, network):
    proc = capped_gateway
    capped = openai.OpenAI(base_url=proc.base_url, api_key="unused-on-loopback", max_retries=0, timeout=120)
    chat = capped.chat.completions.create(model=network.model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    # The cheap worker charges TIME_PRICE per GPU-second: without the cap the gateway would choose it.
    assert chat.model_extra["dspark"]["worker"] == network.dear.peer_id
    store = ReceiptStore.open_readonly(proc.data_dir / STORE_FILE)
    try:
        kept = store.rows()
    finally:
        store.close()
    assert [(worker, row.receipt().price_per_gpu_second_micros) for worker, row in kept] == [(network.dear.peer_id, 0)]


@pytest.mark.parametrize("origin", ["https://evil.example", "null"])
def test_without_keys_a_web_page_of_another_site_cannot_spend_through_the_gateway(capped_gateway, network, origin):
    # A page's fetch(..., {mode: "no-cors", body}) is a "simple" request: no preflight, Host the
    # loopback gateway's own, a text/plain body the gateway reads as JSON. Only its Origin tells it
    # apart ("null" from a sandboxed frame or a file).
    body = json.dumps({"model": network.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    response = httpx.post(f"{capped_gateway.base_url}/chat/completions", content=body, timeout=60,
                          headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": origin})
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden_origin"
    local = httpx.get(f"{capped_gateway.base_url}/models", headers={"Origin": "http://localhost:3000"})
    assert local.status_code == 200          # a page of this machine is as local as the Host check allows


def test_keys_and_caps_from_a_config_file_keep_the_keys_out_of_argv(gateway_factory, network, tmp_path):
    key = "file-key-0123456789abcdef"
    config = tmp_path / "gateway.toml"
    config.write_text(f'api_keys = ["{key}"]\nmax_price_per_gpu_second_micros = {TIME_PRICE - 1}\n')
    config.chmod(0o600)       # the gateway refuses a file of keys that others may read
    proc = gateway_factory(tmp_path / "from-file", "--config", str(config))
    cmdline = Path(f"/proc/{proc.proc.pid}/cmdline").read_bytes()     # what `ps` shows
    assert str(config).encode() in cmdline and key.encode() not in cmdline
    wait_for_workers(proc.base_url, network.model, 2, key)
    assert httpx.get(f"{proc.base_url}/models").status_code == 401
    assert httpx.get(f"{proc.base_url}/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 403
    chat = openai.OpenAI(base_url=proc.base_url, api_key=key, max_retries=0, timeout=120).chat.completions.create(
        model=network.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    assert chat.model_extra["dspark"]["worker"] == network.dear.peer_id      # the file's GPU-second cap held


def latest_receipts(daemon, count: int) -> list:
    worker = Ledger.open_readonly(daemon.data_dir / "ledger.sqlite3")
    try:
        return worker.latest(count)
    finally:
        worker.close()


def last_sequence(daemon) -> int:
    return next((row.sequence for row in latest_receipts(daemon, 1)), 0)


def receipts_after(daemon, sequence: int, count: int = 1) -> list:
    """The worker's `count` receipts after `sequence` (the next jobs'), waiting up to 30 s for them."""
    deadline = time.monotonic() + 30
    while True:
        rows = [row for row in latest_receipts(daemon, count) if row.sequence > sequence]
        if len(rows) == count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_a_client_leaving_mid_stream_cancels_the_job_on_its_worker(client, network, gateway):
    before = last_sequence(network.cheap)
    log = gateway.data_dir / "stderr.log"
    tracebacks = log.read_text().count("Traceback")
    stream = client.chat.completions.create(model=network.model, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=2000, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    # the worker's ledger gets the job's 'cancelled' receipt, billed for what it produced
    (latest,) = receipts_after(network.cheap, before)
    assert latest.outcome == "cancelled" and 0 < latest.output_tokens < 2000
    assert log.read_text().count("Traceback") == tracebacks


def test_a_client_leaving_before_its_answer_cancels_the_job_on_its_worker(capped_gateway, network):
    """uvicorn does not cancel a handler whose client has gone: a whole answer nobody waits for any
    more (an SDK's timeout, a Ctrl-C) would run to its end and be billed, and a stream waiting in a
    worker's line would wait there for its first token."""
    worker = network.dear        # the capped gateway's only choice: a full worker is not passed over
    before = last_sequence(worker)
    log = capped_gateway.data_dir / "stderr.log"
    tracebacks = log.read_text().count("Traceback")
    url = httpx.URL(capped_gateway.base_url)

    def send(**body) -> socket.socket:     # a raw connection, so the test decides when the client leaves
        payload = json.dumps({"model": network.model, "messages": [{"role": "user", "content": PROMPT}],
                              "max_tokens": 2000, "temperature": 0, **body}).encode()
        connection = socket.create_connection((url.host, url.port), timeout=1)
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                           b"application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload))
        return connection

    # Two whole answers fill the worker (max_batch 2), so the stream after them waits in line.
    connections = [send(), send()]
    deadline = time.monotonic() + 30
    while producing(worker) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    connections.append(send(stream=True))
    with pytest.raises(TimeoutError):      # no first token within a second: the stream is in line
        connections[-1].recv(1)
    for connection in connections:
        connection.close()
    receipts = receipts_after(worker, before, 3)
    assert [row.outcome for row in receipts] == ["cancelled"] * 3
    assert sorted(row.output_tokens for row in receipts)[0] == 0          # the stream, cancelled in line
    assert all(row.output_tokens < 2000 for row in receipts)
    assert log.read_text().count("Traceback") == tracebacks


def producing(daemon) -> int:
    """How many jobs with output the daemon has on its engine (its dashboard's JSON)."""
    jobs = httpx.get(daemon.ready["http"] + "/api/v1/jobs", timeout=10).json()
    return sum(job["output_tokens"] > 0 for job in jobs["active"])



def test_a_worker_that_refused_is_tried_last_by_the_next_requests(client, network, gateway, tmp_path):
    # The cheapest worker on the network, but it admits only a client that is not the gateway.
    toml = (network.cheap.data_dir / "node.toml").read_text()
    toml = re.sub(r"per_gpu_second_micros = \d+", "per_gpu_second_micros = 0", toml)
    toml = re.sub(r"per_mtok_micros = \d+", "per_mtok_micros = 100", toml)
    toml += f'[admission]\nmode = "allowlist"\nallow = ["{Identity.generate().peer_id}"]\n'
    refuser = start_daemon(tmp_path / "refuser", toml)
    try:
        wait_for_workers(gateway.base_url, network.model, 3, API_KEY)
        failovers = []
        for _ in range(2):
            chat = client.chat.completions.create(model=network.model, max_tokens=2, temperature=0,
                                                  messages=[{"role": "user", "content": PROMPT}])
            failovers.append(chat.model_extra["dspark"]["failovers"])
            assert chat.model_extra["dspark"]["worker"] == network.cheap.peer_id
        assert failovers == [1, 0]
    finally:
        refuser.stop(signal.SIGKILL)


def test_a_whole_answer_fails_over_from_a_worker_dying_after_its_first_token(client, network, gateway, tmp_path):
    """Not streamed, the answer goes out from the final result only: a worker dying mid-job is
    replaced as one dying before its first token is, instead of ending the request with a 503."""
    toml = (network.cheap.data_dir / "node.toml").read_text()
    # Cheaper per token than the cheap worker, and no time charge: cheaper at any speed, measured or not.
    toml = re.sub(r"per_gpu_second_micros = \d+", "per_gpu_second_micros = 0", toml)
    cheapest = start_daemon(tmp_path / "cheapest", re.sub(r"per_mtok_micros = \d+", "per_mtok_micros = 500", toml))
    try:
        wait_for_workers(gateway.base_url, network.model, 3, API_KEY)
        answer: dict = {}
        request = threading.Thread(target=lambda: answer.update(chat=client.chat.completions.create(
            model=network.model, messages=[{"role": "user", "content": PROMPT}], max_tokens=400, temperature=0)))
        request.start()
        deadline = time.monotonic() + 60
        while not producing(cheapest) and time.monotonic() < deadline:
            time.sleep(0.02)
        cheapest.stop(signal.SIGKILL)
        request.join(timeout=300)
    finally:
        cheapest.stop(signal.SIGKILL)
    extension = answer["chat"].model_extra["dspark"]
    assert extension["worker"] == network.cheap.peer_id and extension["failovers"] >= 1
    assert answer["chat"].usage.completion_tokens == 400

def test_a_dead_worker_fails_over_before_the_first_token(client, network):
    network.cheap.stop(signal.SIGKILL)       # its advert stays live until its TTL: the gateway tries it first
    chat = client.chat.completions.create(model=network.model, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=6, temperature=0)
    extension = chat.model_extra["dspark"]
    assert extension["worker"] == network.dear.peer_id and extension["failovers"] >= 1
    assert chat.usage.completion_tokens == 6


def test_a_worker_dying_mid_stream_ends_the_stream_with_an_error(client, network):
    stream = client.chat.completions.create(model=network.model, messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=2000, temperature=0, stream=True)
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk)
                if len(received) == 1:
                    network.dear.stop(signal.SIGKILL)
    assert received and "failed after" in caught.value.message
    # With no worker left: 503 (first its advert, still live, is unreachable; then none is advertised).
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=network.model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2)
    assert caught.value.status_code == 503
