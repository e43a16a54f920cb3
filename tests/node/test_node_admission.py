"""Admission as pure functions: one property per test, every refusal reason reachable."""

from __future__ import annotations

import dataclasses
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark.v1 import job_pb2
from dspark.v1.envelope_pb2 import Envelope
from engine.api import RequestRejected, SamplingParams
from engine.config import EMBEDDED_MODEL
from node.admission import (Load, Policy, Reason, Refusal, SignedJob, admit, admit_source, check_fit,
                            generation_request, open_job, refusal_for_rejection, source_network)
from node.config import EMBEDDED_MODEL_ID
from node.envelope import pae, seal
from node.identity import Identity

WORKER = Identity.from_seed(b"w" * 32)
CLIENT = Identity.from_seed(b"c" * 32)
NOW = 1_800_000_000_000
POLICY = Policy(worker_peer_id=WORKER.peer_id, model_id="m", max_context=100, max_new_tokens_limit=99,
                price_per_mtok_micros=1000, mode="open", allow=frozenset(), deny=frozenset(), rate_per_minute=3,
                max_concurrent_per_client=2, max_queue=4, clock_skew_ms=5000, longest_token_bytes=4)
IDLE = Load(client_active=0, client_recent=0, queue_depth=0)


def request(**fields) -> job_pb2.JobRequest:
    job = job_pb2.JobRequest(job_id=b"j" * 16, worker_peer_id=WORKER.peer_id, model="m", text="hi",
                             sampling=job_pb2.SamplingParams(max_new_tokens=10), max_price_per_mtok_micros=1000,
                             issued_at_ms=NOW, expires_at_ms=NOW + 60_000)
    for name, value in fields.items():
        if name in ("sampling", "chat", "tokens"):     # message fields; a prompt's replaces the text
            getattr(job, name).CopyFrom(value)
        else:
            setattr(job, name, value)
    return job


def opened(**fields) -> SignedJob:
    job = open_job(seal(CLIENT, request(**fields)))
    assert isinstance(job, SignedJob), job
    return job


def reason(result: Refusal | SignedJob | None) -> Reason | None:
    return result.reason if isinstance(result, Refusal) else None


def test_a_valid_job_is_admitted():
    job = opened()
    assert job.client_key == CLIENT.public_key
    assert job.sampling == SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=10)
    assert admit(job, POLICY, IDLE, NOW) is None


def test_a_clients_jobs_share_a_corpus_scope_no_other_client_does():
    """Jobs of one client may draft from each other's text; another client's never (their speed
    would hint at its content): the scope is the signer's key, whatever the job says."""
    first = generation_request(opened(), (1, 2, 3), "a")
    second = generation_request(opened(job_id=b"k" * 16, text="other"), (4, 5), "b")
    other = generation_request(open_job(seal(Identity.from_seed(b"o" * 32), request())), (1, 2, 3), "a")
    assert first.corpus_scope == second.corpus_scope == CLIENT.public_key.hex()
    assert other.corpus_scope not in (None, first.corpus_scope)
    assert (first.request_id, first.prompt_ids, first.sampling) == ((b"j" * 16).hex() + "-a", (1, 2, 3),
                                                                    opened().sampling)


def test_a_job_s_tenant_in_the_line_for_a_slot_is_its_source_address_whatever_key_signed_it():
    first = generation_request(open_job(seal(CLIENT, request()), "203.0.113.7"), (1, 2, 3), "a")
    other = generation_request(open_job(seal(Identity.from_seed(b"o" * 32), request()), "203.0.113.7"), (1,), "b")
    elsewhere = generation_request(open_job(seal(CLIENT, request()), "2001:db8::/64"), (1, 2, 3), "c")
    assert first.tenant == other.tenant == "203.0.113.7" and elsewhere.tenant == "2001:db8::/64"


def test_signature_is_checked_before_parsing():
    envelope = seal(CLIENT, request())
    envelope.payload = envelope.payload + b"\x00"
    assert reason(open_job(envelope)) is Reason.BAD_SIGNATURE
    envelope = seal(CLIENT, request())
    envelope.public_key = WORKER.public_key
    assert reason(open_job(envelope)) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize("fields", [{"job_id": b"short"}, {"expires_at_ms": NOW}])
def test_malformed_fields(fields):
    assert reason(open_job(seal(CLIENT, request(**fields)))) is Reason.MALFORMED


def test_missing_prompt_is_malformed():
    job = request()
    job.ClearField("text")
    assert reason(open_job(seal(CLIENT, job))) is Reason.MALFORMED


def test_wrong_payload_type_is_malformed():
    assert reason(open_job(seal(CLIENT, job_pb2.CancelJob(job_id=b"j" * 16)))) is Reason.MALFORMED


@pytest.mark.parametrize("fields, expected", [
    ({"worker_peer_id": CLIENT.peer_id}, Reason.WRONG_WORKER),
    ({"issued_at_ms": NOW + 5001, "expires_at_ms": NOW + 60_000}, Reason.NOT_YET_VALID),
    ({"issued_at_ms": NOW - 60_000, "expires_at_ms": NOW - 5001}, Reason.EXPIRED),
    ({"model": "other"}, Reason.UNKNOWN_MODEL),
    ({"max_price_per_mtok_micros": 999}, Reason.PRICE_TOO_LOW),
    ({"sampling": job_pb2.SamplingParams(max_new_tokens=100)}, Reason.TOO_LONG),
    ({"sampling": job_pb2.SamplingParams(max_new_tokens=0)}, Reason.BAD_SAMPLING),
    ({"sampling": job_pb2.SamplingParams(max_new_tokens=5, temperature=-1)}, Reason.BAD_SAMPLING),
    ({"sampling": job_pb2.SamplingParams(max_new_tokens=5, top_p=1.5)}, Reason.BAD_SAMPLING),
])
def test_each_refusal(fields, expected):
    assert reason(admit(opened(**fields), POLICY, IDLE, NOW)) is expected


def test_a_node_that_prices_time_refuses_a_job_that_does_not_agree_to_its_gpu_second_price():
    timed = dataclasses.replace(POLICY, price_per_gpu_second_micros=50)
    assert admit(opened(), POLICY, IDLE, NOW) is None                  # no time price: no cap needed
    assert reason(admit(opened(), timed, IDLE, NOW)) is Reason.PRICE_TOO_LOW   # cap 0: no time charge agreed
    refusal = admit(opened(max_price_per_gpu_second_micros=49), timed, IDLE, NOW)
    assert reason(refusal) is Reason.PRICE_TOO_LOW and "GPU-second" in refusal.message
    assert admit(opened(max_price_per_gpu_second_micros=50), timed, IDLE, NOW) is None


def test_a_prompt_longer_than_the_context_whatever_it_tokenizes_to_is_refused_before_tokenizing():
    """POLICY: a context of 100 tokens, none covering more than 4 bytes."""
    def chat(*contents: str) -> job_pb2.ChatPrompt:
        return job_pb2.ChatPrompt(messages=[job_pb2.ChatMessage(role="user", content=c) for c in contents])
    fits = [opened(text="a" * 400), opened(text="é" * 200), opened(chat=chat(*[""] * 100)),
            opened(chat=chat("a" * 200, "b" * 200)), opened(tokens=job_pb2.TokenPrompt(ids=[1] * 100))]
    assert [admit(job, POLICY, IDLE, NOW) for job in fits] == [None] * 5
    for job, says in [(opened(text="a" * 401), "401 bytes"), (opened(text="é" * 201), "402 bytes"),
                      (opened(chat=chat(*[""] * 101)), "101 chat messages"),
                      (opened(chat=chat("a" * 200, "b" * 201)), "401 bytes"),
                      (opened(tokens=job_pb2.TokenPrompt(ids=[1] * 101)), "101 tokens")]:
        refusal = admit(job, POLICY, IDLE, NOW)
        assert reason(refusal) is Reason.TOO_LONG and says in refusal.message, refusal


@pytest.mark.parametrize("engine_reason, expected", [
    ("too_long", Reason.TOO_LONG), ("bad_sampling", Reason.BAD_SAMPLING),
    ("empty_prompt", Reason.MALFORMED), ("bad_tokens", Reason.MALFORMED)])
def test_the_engines_refusals_keep_their_kind(engine_reason, expected):
    """A prompt of token ids the model has no row for (a tokenizer larger than its embedding) was
    refused as bad_sampling."""
    refusal = refusal_for_rejection(RequestRejected(engine_reason, "why"))
    assert refusal.reason is expected and refusal.message == "why"


def test_clock_skew_window_is_inclusive():
    assert admit(opened(issued_at_ms=NOW + 5000, expires_at_ms=NOW + 9000), POLICY, IDLE, NOW) is None
    assert admit(opened(issued_at_ms=NOW - 9000, expires_at_ms=NOW - 5000), POLICY, IDLE, NOW) is None


def test_non_finite_temperature_is_refused():
    sampling = job_pb2.SamplingParams(max_new_tokens=5, temperature=float("nan"))
    assert reason(open_job(seal(CLIENT, request(sampling=sampling)))) is Reason.BAD_SAMPLING


def test_only_an_unset_top_p_means_no_nucleus_filter():
    assert opened(sampling=job_pb2.SamplingParams(max_new_tokens=5, top_p=0)).sampling.top_p == 1.0
    negative = admit(opened(sampling=job_pb2.SamplingParams(max_new_tokens=5, top_p=-0.5)), POLICY, IDLE, NOW)
    assert reason(negative) is Reason.BAD_SAMPLING and "top_p" in negative.message
    nan = job_pb2.SamplingParams(max_new_tokens=5, top_p=float("nan"))
    assert reason(open_job(seal(CLIENT, request(sampling=nan)))) is Reason.BAD_SAMPLING


def test_the_embedded_models_alias_names_the_model_served_under_its_id():
    served = dataclasses.replace(POLICY, model_id=EMBEDDED_MODEL_ID)
    assert admit(opened(model=EMBEDDED_MODEL), served, IDLE, NOW) is None
    assert admit(opened(model=EMBEDDED_MODEL_ID), served, IDLE, NOW) is None
    assert reason(admit(opened(model=EMBEDDED_MODEL), POLICY, IDLE, NOW)) is Reason.UNKNOWN_MODEL


def test_allow_and_deny_lists():
    allow = dataclasses.replace(POLICY, mode="allowlist", allow=frozenset({WORKER.public_key}))
    assert reason(admit(opened(), allow, IDLE, NOW)) is Reason.NOT_ALLOWED
    assert admit(opened(), dataclasses.replace(allow, allow=frozenset({CLIENT.public_key})), IDLE, NOW) is None
    deny = dataclasses.replace(POLICY, mode="denylist", deny=frozenset({CLIENT.public_key}))
    assert reason(admit(opened(), deny, IDLE, NOW)) is Reason.NOT_ALLOWED
    # Open mode ignores the lists.
    assert admit(opened(), dataclasses.replace(deny, mode="open"), IDLE, NOW) is None


@pytest.mark.parametrize("load, expected", [
    (Load(client_active=2, client_recent=0, queue_depth=0), Reason.TOO_MANY_CONCURRENT),
    (Load(client_active=0, client_recent=3, queue_depth=0), Reason.RATE_LIMITED),
    (Load(client_active=0, client_recent=0, queue_depth=4), Reason.QUEUE_FULL),
    (Load(client_active=0, client_recent=0, queue_depth=0, draining=True), Reason.SHUTTING_DOWN),
])
def test_load_refusals(load, expected):
    assert reason(admit(opened(), POLICY, load, NOW)) is expected


def test_load_just_under_the_limits_is_admitted():
    assert admit(opened(), POLICY, Load(client_active=1, client_recent=2, queue_depth=3), NOW) is None


@pytest.mark.parametrize(("peer", "source"), [
    ("ipv4:203.0.113.7:50286", "203.0.113.7"),
    ("ipv6:%5B2001:db8:1:2:aaaa:bbbb:cccc:dddd%5D:40816", "2001:db8:1:2::/64"),
    ("ipv6:%5B2001:db8:1:2::1%5D:1", "2001:db8:1:2::/64"),            # the same /64: one source
    ("ipv6:%5B2001:db8:1:3::1%5D:1", "2001:db8:1:3::/64"),
    ("ipv6:[::1]:5", "::/64"),
    ("ipv6:%5B::ffff:203.0.113.7%5D:9", "203.0.113.7"),                # IPv4 on a dual-stack socket
    ("unix:/run/dspark.sock", "unix:/run/dspark.sock"),
    ("ipv4:not-an-address:1", "ipv4:not-an-address:1"),
])
def test_source_network_groups_a_host_s_addresses(peer, source):
    assert source_network(peer) == source


def test_the_address_limits_refuse_at_their_counts_and_zero_is_none():
    limited = dataclasses.replace(POLICY, address_rate_per_minute=5, max_concurrent_per_address=2)
    assert admit_source("203.0.113.7", 4, 1, limited) is None
    refusal = admit_source("203.0.113.7", 5, 1, limited)
    assert refusal == Refusal(Reason.RATE_LIMITED, "203.0.113.7 sent 5 jobs in the last minute (limit 5 per address)")
    refusal = admit_source("2001:db8::/64", 0, 2, limited)
    assert refusal == Refusal(Reason.TOO_MANY_CONCURRENT,
                              "2001:db8::/64 already has 2 job(s) running or waiting (limit 2 per address)")
    unlimited = dataclasses.replace(POLICY, address_rate_per_minute=0, max_concurrent_per_address=0)
    assert admit_source("203.0.113.7", 10**6, 10**6, unlimited) is None


def test_fit_counts_prompt_and_new_tokens():
    sampling = SamplingParams(max_new_tokens=10)
    assert check_fit(90, sampling, POLICY) is None
    assert reason(check_fit(91, sampling, POLICY)) is Reason.TOO_LONG
    assert reason(check_fit(0, sampling, POLICY)) is Reason.MALFORMED


@settings(max_examples=300, deadline=None)
@given(payload_type=st.sampled_from(["dspark.v1.JobRequest", "dspark.v1.Receipt", "", "x" * 300]),
       payload=st.binary(max_size=512), public_key=st.binary(max_size=40), signature=st.binary(max_size=70))
def test_arbitrary_envelopes_are_refused_never_raise(payload_type, payload, public_key, signature):
    result = open_job(Envelope(payload_type=payload_type, payload=payload, public_key=public_key,
                               signature=signature))
    assert isinstance(result, Refusal)   # nothing random carries a valid signature


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(max_size=512))
def test_signed_garbage_payloads_never_raise(payload):
    envelope = Envelope(payload_type="dspark.v1.JobRequest", payload=payload, public_key=CLIENT.public_key)
    envelope.signature = CLIENT.sign(pae(envelope.payload_type, payload))
    result = open_job(envelope)
    if isinstance(result, SignedJob):
        # It parsed and passed the field checks: admission must still decide without raising.
        admit(result, POLICY, IDLE, int(time.time() * 1000))
    else:
        assert result.reason in (Reason.MALFORMED, Reason.BAD_SAMPLING)
