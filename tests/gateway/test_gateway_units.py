"""The gateway's pure parts: OpenAI request validation and mapping, error mapping, and the client-side
receipt store with its audit (real SQLite files, receipts signed by a real worker ledger)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from dspark.v1.receipt_pb2 import Receipt
from engine.config import EMBEDDED_MODEL
from node.config import EMBEDDED_MODEL_ID
from node.gateway.errors import ApiError, network_error
from node.gateway.openai_schema import DEFAULT_COMPLETION_MAX_TOKENS, MAX_PROMPT_BYTES, parse_request
from node.gateway.receipt_audit import audit_store
from node.gateway.receipt_store import LOCAL_KEY, ReceiptStore, account_of
from node.ledger import Ledger, LedgerError
from node.p2p.failover import Attempt, NoWorkerError
from node.receipts import acknowledgment
from tests.receipts.receipts_helpers import CLIENT, OTHER_CLIENT, WORKER, bill

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_maps_one_to_one():
    params = parse_request("chat", {**CHAT, "messages": [{"role": "developer", "content": "be brief"},
                                                         {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                      {"type": "text", "text": "b"}]}],
                                    "temperature": 0.3, "top_p": 0.9, "max_completion_tokens": 5, "seed": 3,
                                    "stop": "\n", "stream": True, "stream_options": {"include_usage": True}})
    assert params.prompt == {"chat": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]}
    assert (params.temperature, params.top_p, params.max_new_tokens) == (0.3, 0.9, 5)
    assert (params.seed, params.stop) == (3, ("\n",))
    assert params.stream and params.include_usage


def test_null_is_an_optional_parameters_default_as_in_openai():
    params = parse_request("chat", {**CHAT, **dict.fromkeys(("stream", "stream_options", "temperature", "top_p",
                                                             "max_tokens", "seed", "stop", "n", "user"))})
    assert params == parse_request("chat", CHAT)
    streamed = {**CHAT, "stream": True}
    for options in ({"include_usage": None}, {"include_obfuscation": None}, {"include_obfuscation": False}):
        assert parse_request("chat", {**streamed, "stream_options": options}) == parse_request("chat", streamed)


def test_the_tags_that_succeed_user_and_store_false_change_nothing():
    tags = {"user": "u", "safety_identifier": "u-1", "prompt_cache_key": "k", "store": False}
    assert parse_request("chat", {**CHAT, **tags}) == parse_request("chat", CHAT)


def test_no_effect_values_are_accepted_as_json_numbers_or_false():
    neutral = {"n": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0, "logprobs": False, "tools": []}
    assert parse_request("chat", {**CHAT, **neutral}) == parse_request("chat", CHAT)
    completion = {"model": "m", "prompt": "x"}
    assert parse_request("completion", {**completion, "echo": False, "best_of": 1}) == parse_request("completion",
                                                                                                   completion)


def test_the_embedded_models_alias_asks_for_the_id_workers_advertise():
    params = parse_request("chat", {**CHAT, "model": EMBEDDED_MODEL})
    assert params.model == EMBEDDED_MODEL_ID
    assert parse_request("chat", {**CHAT, "model": EMBEDDED_MODEL_ID}).model == EMBEDDED_MODEL_ID


def test_completion_prompts_and_defaults():
    assert parse_request("completion", {"model": "m", "prompt": "x"}).max_new_tokens == DEFAULT_COMPLETION_MAX_TOKENS
    assert parse_request("completion", {"model": "m", "prompt": [5, 6]}).prompt == {"token_ids": [5, 6]}
    assert parse_request("completion", {"model": "m", "prompt": ["only"]}).prompt == {"text": "only"}
    assert parse_request("completion", {"model": "m", "prompt": [[5, 6]]}).prompt == {"token_ids": [5, 6]}


@pytest.mark.parametrize("kind, body, param", [
    ("chat", {**CHAT, "frequency_penalty": 1}, "frequency_penalty"),
    ("chat", {**CHAT, "some_new_knob": 1}, "some_new_knob"),
    ("chat", {**CHAT, "top_p": 0}, "top_p"),
    ("chat", {**CHAT, "seed": -1}, "seed"),
    ("chat", {**CHAT, "seed": 2**63}, "seed"),           # the worker's limit: refused before a job is sent
    ("chat", {**CHAT, "stop": ["x" * 257]}, "stop"),
    ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {**CHAT, "max_tokens": 4, "max_completion_tokens": 5}, "max_tokens"),
    ("chat", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {**CHAT, "stream": "maybe"}, "stream"),
    ("chat", {**CHAT, "stream": "yes"}, "stream"),
    ("chat", {**CHAT, "max_tokens": True}, "max_tokens"),
    ("chat", {**CHAT, "temperature": "0.5"}, "temperature"),
    ("chat", {**CHAT, "seed": 1.0}, "seed"),
    ("completion", {"model": "m", "prompt": [True, 5]}, "prompt"),
    ("chat", {**CHAT, "stream": True, "stream_options": {"include_usage": "x"}}, "stream_options.include_usage"),
    ("chat", {**CHAT, "stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options.include_obfuscation"),
    ("chat", {"model": "m", "messages": []}, "messages"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ("chat", {**CHAT, "messages": [{"role": "assistant", "content": "x", "refusal": "no"}]}, "messages.0.refusal"),
    ("chat", {**CHAT, "messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
     "messages.0.tool_calls"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ("completion", {"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ("completion", {"model": "m", "prompt": [[5], [6]]}, "prompt"),
    ("completion", {"model": "m", "prompt": [[]]}, "prompt"),
    ("completion", {"model": "m", "prompt": "a" * MAX_PROMPT_BYTES}, "prompt"),      # more with its field tag
    ("completion", {"model": "m", "prompt": [2**32 - 1] * 300_000}, "prompt"),       # 5 bytes an id
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "é" * 600_000}]}, "messages"),
    ("completion", {"model": "m", "prompt": "a", "echo": True}, "echo"),
    ("completion", {"model": "m", "prompt": "a", "best_of": 2}, "best_of"),
    # true == 1 and 0 == false in Python, not in JSON: no no-effect value of another type
    ("chat", {**CHAT, "n": True}, "n"),
    ("chat", {**CHAT, "presence_penalty": False}, "presence_penalty"),
    ("chat", {**CHAT, "logprobs": 0}, "logprobs"),
    ("chat", {**CHAT, "store": True}, "store"),
    ("chat", {**CHAT, "safety_identifier": 5}, "safety_identifier"),
    ("completion", {"model": "m", "prompt": "a", "echo": 0}, "echo"),
    ("completion", {"model": "m", "prompt": "a", "best_of": True}, "best_of"),
])
def test_refusals_name_the_parameter(kind, body, param):
    with pytest.raises(ApiError) as caught:
        parse_request(kind, body)
    assert caught.value.status == 400
    assert caught.value.param is not None and caught.value.param.startswith(param)


@pytest.mark.parametrize("body, param, message", [
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type", "Input should be 'text'"),
    ({**CHAT, "stop": ["a", 5]}, "stop.1", "Input should be a valid string"),
    ({**CHAT, "messages": [{"role": "user", "content": None}]}, "messages.0.content", "Input should be a valid string"),
])
def test_a_refusal_of_a_union_field_says_what_is_wrong_with_the_value_given(body, param, message):
    # Not the first member's error: an image part is not refused for not being a string.
    with pytest.raises(ApiError) as caught:
        parse_request("chat", body)
    assert (caught.value.param, caught.value.message) == (param, f"invalid parameter {param!r}: {message}")


@pytest.mark.parametrize("kind, raw, param", [
    ("chat", r'{"model": "m", "messages": [{"role": "user", "content": "hi \ud800"}]}', "messages.0.content"),
    ("chat", r'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}',
     "messages.0.content.0.text"),
    ("chat", r'{"model": "m\ud83d", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("chat", r'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "\ud800"]}',
     "stop.1"),
    ("completion", r'{"model": "m", "prompt": ["\udc00 once"]}', "prompt.0"),
    ("completion", r'{"model": "m", "prompt": "a", "\ud800x": 1}', "\\ud800x"),
])
def test_a_lone_surrogate_is_refused_naming_where(kind, raw, param):
    # What json.loads makes of a "\ud800" escape: a str that cannot be encoded as UTF-8, so it could
    # not be signed into a job; the refusal itself must still encode (the param shows the escape).
    with pytest.raises(ApiError) as caught:
        parse_request(kind, json.loads(raw))
    assert (caught.value.status, caught.value.param) == (400, param)
    assert "lone UTF-16 surrogate" in caught.value.message
    assert json.loads(caught.value.response().body)["error"]["param"] == param


def test_network_failures_map_to_statuses():
    def status(*attempts: Attempt) -> int:
        return network_error(NoWorkerError("x", list(attempts)), "m", "messages").status

    assert status() == 429                                            # none within the price cap
    assert status(Attempt("a", "e", "refused", reason="queue_full"), Attempt("b", "e", "refused",
                                                                            reason="rate_limited")) == 429
    assert status(Attempt("a", "e", "refused", reason="too_long")) == 400
    assert status(Attempt("a", "e", "unreachable"), Attempt("b", "e", "refused", reason="queue_full")) == 503
    assert status(Attempt("a", "e", "died", chunks_received=3)) == 503
    # OpenAI names the prompt's parameter when it does not fit the context, and no parameter otherwise
    too_long = network_error(NoWorkerError("x", [Attempt("a", "e", "refused", reason="too_long")]), "m", "prompt")
    assert (too_long.param, too_long.code) == ("prompt", "context_length_exceeded")
    bad = network_error(NoWorkerError("x", [Attempt("a", "e", "refused", reason="bad_sampling")]), "m", "messages")
    assert bad.param is None


@pytest.fixture
def worker_receipts(tmp_path):
    ledger = Ledger.open(tmp_path / "worker.sqlite3", WORKER)
    envelopes = [bill(ledger, n) for n in range(1, 5)]
    ledger.close()
    return envelopes


def _keep(store: ReceiptStore, envelope, account: str = LOCAL_KEY, signer=CLIENT) -> None:
    store.add(envelope, Receipt.FromString(envelope.payload), acknowledgment(signer, envelope), account)


def test_store_audits_clean_and_counts_spending(tmp_path, worker_receipts):
    store = ReceiptStore.open(tmp_path / "store.sqlite3", CLIENT.public_key)
    for envelope in worker_receipts[:2] + worker_receipts[3:]:          # a gap (another client's job) is fine
        _keep(store, envelope, account_of("key-a"))
    report = audit_store(store)
    assert report.ok and report.checked == report.acknowledged == 3
    amounts = [Receipt.FromString(e.payload).amount_micros for e in worker_receipts]
    assert store.spent(account_of("key-a")) == report.amount_micros == amounts[0] + amounts[1] + amounts[3] > 0
    assert store.spent(LOCAL_KEY) == 0
    with pytest.raises(sqlite3.IntegrityError):                             # append-only
        store._conn.execute("UPDATE receipts SET amount_micros = 0")
    store.close()
    with pytest.raises(LedgerError):
        ReceiptStore.open(tmp_path / "store.sqlite3", OTHER_CLIENT.public_key)


def test_audit_names_a_forked_worker_a_broken_chain_and_a_bad_ack(tmp_path, worker_receipts):
    forked = Ledger.open(tmp_path / "fork.sqlite3", WORKER)
    fork = bill(forked, 99)                                  # another receipt 1, signed by the same worker
    forked.close()
    store = ReceiptStore.open(tmp_path / "store.sqlite3", CLIENT.public_key)
    _keep(store, worker_receipts[0])
    _keep(store, fork)
    _keep(store, worker_receipts[2], signer=OTHER_CLIENT)    # acknowledgment signed by someone else
    problems = [str(p) for p in audit_store(store).problems]
    store.close()
    assert any("forked" in p for p in problems)
    assert any("acknowledgment is not signed by the receipt's client" in p for p in problems)

    store = ReceiptStore.open(tmp_path / "chain.sqlite3", CLIENT.public_key)
    _keep(store, fork)                                       # receipt 1 of the fork...
    _keep(store, worker_receipts[1])                         # ...then receipt 2 of the real chain
    problems = [str(p) for p in audit_store(store).problems]
    store.close()
    assert problems and "chain broken" in problems[0]


@pytest.mark.parametrize("column", ["envelope", "ack"])
def test_audit_names_a_store_row_holding_text_where_bytes_belong(tmp_path, worker_receipts, column):
    store = ReceiptStore.open(tmp_path / "store.sqlite3", CLIENT.public_key)
    for envelope in worker_receipts[:2]:
        _keep(store, envelope)
    store.close()
    conn = sqlite3.connect(tmp_path / "store.sqlite3", isolation_level=None)
    conn.execute("DROP TRIGGER receipts_append_only_u")
    conn.execute(f"UPDATE receipts SET {column} = hex({column}) WHERE sequence = 2")
    conn.close()
    store = ReceiptStore.open_readonly(tmp_path / "store.sqlite3")
    problems = [str(p) for p in audit_store(store).problems]
    store.close()
    what = "envelope" if column == "envelope" else "acknowledgment"
    assert len(problems) == 1 and problems[0].startswith("sequence 2: worker ")
    assert problems[0].endswith(f"the stored {what} is text, not bytes")


BOOTSTRAP = f"/ip4/127.0.0.1/tcp/1/p2p/{WORKER.peer_id}"


@pytest.mark.parametrize("flags, message", [
    (["--listen", "0.0.0.0:8080", "--bootstrap", BOOTSTRAP], "not a loopback address: give --api-key"),
    (["--bootstrap", BOOTSTRAP, "--api-key", "short"], "--api-key: an API key must be at least 16"),
    (["--bootstrap", BOOTSTRAP, "--budget", "-5"], "--budget: Input should be greater than or equal"),
    (["--bootstrap", BOOTSTRAP, "--max-price-gpu-second", "-1"],
     "--max-price-gpu-second: Input should be greater than or equal to 0"),
    (["--bootstrap", BOOTSTRAP, "--max-price-gpu-second", str(2**63)],
     "--max-price-gpu-second: Input should be less than 9223372036854775808"),
    (["--bootstrap", "not-a-multiaddr"], "--bootstrap: 'not-a-multiaddr' is not a multiaddr"),
    (["--bootstrap", "/ip4/127.0.0.1/tcp/1"], "--bootstrap: '/ip4/127.0.0.1/tcp/1' is not a multiaddr ending in /p2p/"),
    ([], "give --bootstrap MULTIADDR (or --mdns)"),
])
def test_gateway_command_refuses_bad_flags_before_starting(tmp_path, capsys, flags, message):
    from node.cli import main

    assert main(["gateway", "--data-dir", str(tmp_path / "gw"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "gw").exists()          # nothing written: no key, no store


def test_models_count_no_draining_worker():
    """A worker shutting down takes no job: it is no worker of its model, nor are its slots free."""
    from dspark.v1.advert_pb2 import CapacityAdvert, ModelOffer
    from node.gateway.gateway import model_list

    def advert(peer: str, price: int, draining: bool = False) -> CapacityAdvert:
        return CapacityAdvert(peer_id=peer, models=[ModelOffer(id="m", max_context=2048)], price_per_mtok_micros=price,
                              free_slots=2, tokens_per_second=9.0, draining=draining)
    (card,) = model_list([advert("a", 500), advert("b", 100, draining=True)]).data
    assert (card.id, card.dspark["workers"], card.dspark["free_slots"]) == ("m", 1, 2)
    assert card.dspark["best_price_per_mtok_micros"] == 500
    assert model_list([advert("b", 100, draining=True)]).data == []
