"""The HTTP service over a real socket: JSON API, metrics, export, live events, and access rules."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import threading
import time
from contextlib import closing

import httpx
import pytest

from engine.api import CorpusFill, DraftCounts
from node.events import JobRefused
from node.http_server import COOKIE, HttpConfigError, HttpService
from node.identity import Identity

from .factories import GIB, engine_info
from .harness import NodeUnderTest, new_job_id

TOKEN = "s3cret.dash_board~token-0123"   # every non-alphanumeric the token may hold (DashboardConfig)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = NodeUnderTest(tmp_path_factory.mktemp("http")).start()
    yield n
    n.stop()


@pytest.fixture(scope="module")
def client(node):
    with httpx.Client(base_url=node.url, timeout=10) as c:
        yield c


def test_status_names_model_device_and_load(node, client):
    s = client.get("/api/v1/status").json()
    assert s["peer_id"] == node.identity.peer_id
    assert s["engine"]["model_id"] == "smollm2-135m-instruct" and s["engine"]["device"] == "cpu"
    assert s["engine"]["model_digest"] == bytes(range(32)).hex()
    assert s["load"] == {"active": node.engine.active, "free_slots": node.engine.free_slots, "queue_depth": 0}
    assert s["gpu"]["name"] == "cpu" and s["process_rss_bytes"] > 10_000_000
    assert s["price_per_mtok_micros"] == node.config.pricing.per_mtok_micros
    assert s["gpu_memory"] == {"devices": [], "reason": "the engine runs on the CPU"}
    # the limits a refused client met; not the allow and deny lists, which name clients
    assert s["admission"]["max_concurrent_per_address"] == node.config.admission.max_concurrent_per_address
    assert s["admission"]["mode"] == "open" and not {"allow", "deny"} & s["admission"].keys()


def test_status_on_a_gpu_reports_the_memory_the_node_holds_on_each_device(node, client, two_gpus, monkeypatch):
    monkeypatch.setattr(node.engine, "info", engine_info(device="NVIDIA H200"))
    memory = client.get("/api/v1/status").json()["gpu_memory"]
    assert memory["reason"] == "" and [d["index"] for d in memory["devices"]] == [0, 1]
    assert memory["devices"][0] == {"index": 0, "name": "NVIDIA H200", "reserved_bytes": 30 * GIB,
                                    "allocated_bytes": 24 * GIB, "total_bytes": 141 * GIB}


def test_a_job_shows_in_jobs_earnings_metrics_and_export(node, client):
    buyer = Identity.generate()
    job = new_job_id()
    node.admit(job, buyer)
    node.progress(job, 1, 0.2)
    node.progress(job, 11, 1.2)
    (active,) = [j for j in client.get("/api/v1/jobs").json()["active"] if j["job_id"] == job.hex()]
    assert active["output_tokens"] == 11 and active["tokens_per_second"] == pytest.approx(10.0)
    before = client.get("/api/v1/earnings").json()
    receipt = node.finish(job, buyer, tokens=24)
    jobs = client.get("/api/v1/jobs").json()
    assert job.hex() not in {j["job_id"] for j in jobs["active"]}
    assert jobs["recent"][0]["job_id"] == job.hex() and jobs["recent"][0]["amount_micros"] == receipt.amount_micros
    earnings = client.get("/api/v1/earnings").json()
    assert earnings["receipts"] == before["receipts"] + 1 and receipt.amount_micros > 0
    assert earnings["amount_micros"] == before["amount_micros"] + receipt.amount_micros
    assert earnings["per_client_micros"][buyer.public_key.hex()] == receipt.amount_micros
    assert earnings["recent"][0]["sequence"] == receipt.sequence
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert f"dspark_receipts_total {float(earnings['receipts'])}" in metrics.text
    export = client.get(earnings["export"]["jsonl"])
    records = [json.loads(line) for line in export.text.splitlines()]
    assert {r["sequence"] for r in records if r["record"] == "receipt"} >= {receipt.sequence}
    assert records[-1]["record"] == "period" and records[-1]["amount_micros"] == earnings["amount_micros"]
    csv_lines = client.get(earnings["export"]["csv"]).text.splitlines()
    assert csv_lines[0].startswith("record,") and len(csv_lines) == len(records) + 1


def test_earnings_name_the_clients_billed_most_and_sum_the_others(tmp_path):
    """A node whose clients sign with fresh keys has a client per job: the answer must not grow with them."""
    node = NodeUnderTest(tmp_path)
    amounts = []
    for tokens in range(1000, 13_000, 1000):     # twelve clients, one receipt each
        buyer, job = Identity.generate(), new_job_id()
        node.admit(job, buyer)
        amounts.append(node.finish(job, buyer, tokens).amount_micros)
    node.start()
    try:
        earnings = httpx.get(f"{node.url}/api/v1/earnings", timeout=10).json()
    finally:
        node.stop()
    assert sorted(earnings["per_client_micros"].values()) == sorted(amounts)[2:]
    assert earnings["other_clients"] == {"clients": 2, "amount_micros": sum(sorted(amounts)[:2])}


def test_series_acceptance_and_budget_have_data_after_rounds(node, client):
    job = new_job_id()
    buyer = Identity.generate()
    node.admit(job, buyer)
    node.progress(job, 1, 0.1, budgets=(4, 2))
    node.finish(job, buyer, tokens=9)
    series = client.get("/api/v1/series").json()
    assert series["points"] and series["points"][-1]["tokens_per_second"] > 0
    assert client.get("/api/v1/acceptance").json()["positions"][0]["reached"] > 0
    assert {r["batch_size"] for r in client.get("/api/v1/budget").json()["rows"]} >= {1, 2}


def test_drafts_by_source_and_the_corpus_fill(node, client):
    def sources() -> dict[str, dict]:
        return {r["source"]: r for r in client.get("/api/v1/drafts").json()["sources"]}
    before = sources()
    buyer, job = Identity.generate(), new_job_id()
    node.admit(job, buyer)
    node.finish(job, buyer, tokens=9, corpus=DraftCounts(drafted=5, verified=4, accepted=3))
    after = sources()
    assert list(after) == ["own", "corpus", "drafter"]
    assert [after["corpus"][k] - before["corpus"][k] for k in ("drafted", "verified", "accepted")] == [5, 4, 3]
    assert after["own"] == before["own"]
    assert client.get("/api/v1/drafts").json()["corpus"] is None, "the engine keeps no corpus"
    node.engine.corpus_fill = CorpusFill(tokens=700, documents=2, capacity=4096)
    try:
        assert client.get("/api/v1/drafts").json()["corpus"] == {"tokens": 700, "documents": 2, "capacity": 4096}
    finally:
        node.engine.corpus_fill = None


@pytest.mark.parametrize("query, problem", [("format=xml", "format must be one of"),
                                            ("format=csv&since=yesterday", "neither unix milliseconds"),
                                            ("format=jsonl&since=99999999999999999999999", "out of range"),
                                            ("format=jsonl&until=-1", "out of range"),
                                            ("since=2026-02-01&until=2026-01-01", "must be before until")])
def test_export_refuses_bad_parameters(client, query, problem):
    response = client.get(f"/api/v1/earnings/export?{query}")
    assert response.status_code == 400 and problem in response.json()["error"]


def test_events_stream_ticks_and_forwards_refusals(node, client):
    with client.stream("GET", "/api/v1/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("event:")) == "event: tick"
        threading.Timer(0.2, lambda: node.bus.publish(JobRefused(reason="expired", message="too old"))).start()
        deadline = time.monotonic() + 5
        for line in lines:
            if line == "event: refused":
                data = json.loads(next(lines)[len("data: "):])
                assert data["reason"] == "expired" and data["message"] == "too old"
                break
            assert time.monotonic() < deadline, "no refused event within 5 s"
    problems = client.get("/api/v1/problems").json()["problems"]
    assert problems[0]["reason"] == "expired"


def test_foreign_host_header_is_refused_on_loopback(client):
    response = client.get("/api/v1/status", headers={"Host": "evil.example:7441"})
    assert response.status_code == 421 and "loopback" in response.text
    assert client.get("/", headers={"Host": "localhost:7441"}).status_code == 200


@pytest.mark.parametrize("damage, problem", [
    (["DROP TABLE acknowledgments"], "the ledger cannot be read (no such table: acknowledgments)"),
    (["DROP TRIGGER receipts_append_only_u", "UPDATE receipts SET envelope = hex(envelope)"],
     "sequence 1: the stored envelope is text, not bytes"),
])
def test_export_of_a_ledger_that_cannot_be_read_is_503_with_the_reason(tmp_path, caplog, damage, problem):
    node = NodeUnderTest(tmp_path).start()
    try:
        buyer, job = Identity.generate(), new_job_id()
        node.admit(job, buyer)
        node.finish(job, buyer, tokens=3)
        with closing(sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)) as conn:
            for statement in damage:
                conn.execute(statement)
        with httpx.Client(base_url=node.url, timeout=10) as c:
            response = c.get("/api/v1/earnings/export?format=csv")
        assert response.status_code == 503 and response.headers["content-type"] == "application/json"
        assert problem in response.json()["error"] and "operator" in response.json()["error"]
        assert any(problem in r.getMessage() for r in caplog.records if r.name == "node.http_api")
    finally:
        node.stop()


def test_dashboard_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>dspark-node</title>" in page.text
    for asset in ("/static/app.js", "/static/charts.js", "/static/style.css"):
        assert client.get(asset).status_code == 200, asset


def test_token_is_required_everywhere_when_set(tmp_path):
    node = NodeUnderTest(tmp_path, token=TOKEN).start()
    try:
        with httpx.Client(base_url=node.url, timeout=10) as c:
            for path in ("/", "/metrics", "/api/v1/status", "/static/app.js"):
                assert c.get(path).status_code == 401, path
            assert c.get("/metrics", headers={"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
            assert c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            page = c.get(f"/?token={TOKEN}")
            assert page.status_code == 200 and page.cookies.get(COOKIE) == TOKEN
            assert c.get("/api/v1/status").status_code == 200      # the cookie now carries it
            c.cookies.clear()
            assert c.get("/api/v1/status").status_code == 401
    finally:
        node.stop()


def test_refusals_under_the_api_are_json_like_its_other_errors(tmp_path, client):
    refused = client.get("/api/v1/status", headers={"Host": "evil.example:7441"})
    assert refused.status_code == 421 and refused.headers["content-type"] == "application/json"
    assert refused.json() == {"error": "Host 'evil.example:7441' is not a loopback name; this node's dashboard is "
                                       "local only"}
    node = NodeUnderTest(tmp_path / "with-token", token=TOKEN).start()
    try:
        with httpx.Client(base_url=node.url, timeout=10) as c:
            for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}):
                refused = c.get("/api/v1/status", headers=headers)
                assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
                assert refused.json() == {"error": "this node's dashboard needs its token: Authorization: Bearer "
                                                   "TOKEN or ?token=TOKEN (the node's dashboard.token setting, "
                                                   "DSPARK_DASHBOARD__TOKEN)"}
            page = c.get("/")      # a person at a browser reads the words, not JSON
            assert page.status_code == 401 and page.headers["content-type"].startswith("text/plain")
            assert page.text.startswith("this node's dashboard needs its token")
    finally:
        node.stop()


def _service(node: NodeUnderTest, **changes) -> HttpService:
    config = node.config.model_copy(update=changes)
    return HttpService(config, node.identity, node.engine, node.ledger, node.bus, node.capacity)


def test_non_loopback_bind_without_token_refuses_to_start(node):
    with pytest.raises(HttpConfigError, match="dashboard.token"):
        _service(node, http_listen="0.0.0.0:7441")


def test_port_in_use_is_a_clear_error(node):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        service = _service(node, http_listen=f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(HttpConfigError, match="cannot listen on 127.0.0.1"):
            asyncio.run(service.start())


def test_capacity_and_listen_use_plain_json(node, client):
    advert = client.get("/api/v1/capacity").json()
    assert advert["peer_id"] == node.identity.peer_id
    assert advert["models"][0]["digest"] == bytes(range(32)).hex()          # hex, as everywhere in the API
    assert isinstance(advert["sequence"], int) and advert["sequence"] > 0    # a number, not a string
    assert client.get("/api/v1/status").json()["listen"]["http"] == node.url.removeprefix("http://")


@pytest.mark.parametrize("path, problem", [
    ("/api/v1/earnings/export?format=csv&sinse=2026-01-01",
     "unknown query parameter 'sinse': /api/v1/earnings/export takes only format, since, until"),
    ("/api/v1/earnings/export?format=csv&format=jsonl", "query parameter 'format' is given 2 times; give it once"),
    ("/api/v1/jobs?limit=-1", "unknown query parameter 'limit': /api/v1/jobs takes no query parameters"),
    ("/api/v1/earnings?offset=99999999999999999999",
     "unknown query parameter 'offset': /api/v1/earnings takes no query parameters"),
])
def test_a_query_the_endpoint_does_not_take_is_refused(client, path, problem):
    # Ignored, a misspelt `since` exported the whole ledger and a `limit` returned everything.
    response = client.get(path)
    assert response.status_code == 400 and response.json() == {"error": problem}


def test_the_token_may_ride_along_any_query(tmp_path):
    node = NodeUnderTest(tmp_path, token=TOKEN).start()
    try:
        with httpx.Client(base_url=node.url, timeout=10) as c:
            assert c.get(f"/api/v1/jobs?token={TOKEN}").status_code == 200
            assert c.get(f"/api/v1/earnings/export?format=csv&token={TOKEN}").status_code == 200
    finally:
        node.stop()


def test_unknown_endpoints_and_methods_under_the_api_are_json(client):
    missing = client.get("/api/v1/nope")
    assert missing.status_code == 404
    assert missing.json() == {"error": "no endpoint /api/v1/nope; docs/api.md lists them"}
    posted = client.post("/api/v1/jobs")
    assert posted.status_code == 405 and set(posted.headers["allow"].split(", ")) == {"GET", "HEAD"}
    assert posted.json() == {"error": "POST is not allowed on /api/v1/jobs; it answers GET, HEAD"}
    assert client.get("/static/nope.js").status_code == 404     # outside the API: plain text, as before
    assert client.delete("/metrics").headers["content-type"].startswith("text/plain")
