"""The dashboard in Debian's headless Chromium (Playwright): no console errors, the node's identity
on the page, a job appearing live with its speed, then the earnings panel after its receipt; where
drafts came from and how full the lookup corpus is."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from engine.api import CorpusFill, DraftCounts
from node.activity import RECENT_JOBS
from node.events import AdvertPublished, AdvertSeen, JobRefused, NodeDraining, PeerChange
from node.identity import Identity

from .factories import finished, stats
from .harness import ARTIFACTS, NodeUnderTest, new_job_id

@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = NodeUnderTest(tmp_path_factory.mktemp("browser")).start()
    yield n
    n.stop()


def play_job(node: NodeUnderTest, job: bytes, client: Identity, tokens: int, seconds: float) -> None:
    """Stream `tokens` over `seconds` the way the service reports progress, then sign its receipt."""
    start = time.monotonic()
    for produced in range(1, tokens + 1):
        node.progress(job, produced, time.monotonic() - start, budgets=(4,) * max(1, node.engine.active))
        time.sleep(seconds / tokens)
    node.finish(job, client, tokens)


def test_dashboard_live_job_and_earnings(node, page):
    page.goto(node.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('smollm2')")
    assert "cpu" in page.text_content("#device")
    assert page.text_content("#peer-id") == node.identity.peer_id
    page.wait_for_function("document.getElementById('live').textContent === 'live'")
    assert page.text_content("#earned") == "0.000000"

    buyer = Identity.generate()
    job = new_job_id()
    node.admit(job, buyer)
    player = threading.Thread(target=play_job, args=(node, job, buyer, 40, 4.0))
    player.start()
    short = job.hex()[:8]
    # The active job appears (SSE "admitted"), then its live speed fills in from the ticks.
    page.wait_for_function(f"""() => [...document.querySelectorAll('#active-jobs tbody tr')].some(
        r => r.cells[0].textContent.startsWith('{short}') && parseFloat(r.cells[3].textContent) > 0)""",
                           timeout=8000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-active-job.png"), full_page=True)
    assert page.text_content("#tau-now").startswith("now ")
    player.join()
    page.wait_for_function("document.getElementById('receipts').textContent === '1'", timeout=8000)
    earned = float(page.text_content("#earned"))
    assert earned > 0 and earned * 1e6 == pytest.approx(node.ledger.totals().amount_micros)
    page.wait_for_function(f"""() => [...document.querySelectorAll('#recent-jobs tbody tr')].some(
        r => r.cells[1].textContent.startsWith('{short}') && r.cells[3].textContent === 'completed')""")
    assert page.locator("#chart-tps path").count() == 1         # the throughput line is drawn
    # every round of the played job drafted for its one request and verified 4 draft tokens
    page.wait_for_function("""() => [...document.querySelectorAll('#budget-table tbody tr')].some(
        r => r.cells[0].textContent === '1' && r.cells[2].textContent === '100%'
             && r.cells[3].textContent === '4.00')""")
    # idle: no τ "now" (it said the last rounds' τ for up to 20 s after, beside "idle")
    page.wait_for_function("document.getElementById('tps-now').textContent === 'idle'")
    assert page.text_content("#tau-now") == ""
    page.screenshot(path=str(ARTIFACTS / "dashboard-after-job.png"), full_page=True)
    assert page.console_problems == []


def test_draft_sources_and_corpus_fill(node, page):
    page.goto(node.url + "/")
    page.wait_for_function("document.getElementById('corpus-fill').textContent.includes('no corpus')")
    node.engine.corpus_fill = CorpusFill(tokens=3000, documents=4, capacity=12000)
    try:
        page.wait_for_function("document.getElementById('corpus-fill').textContent.includes('25%')", timeout=8000)
        assert "3000 tokens of 4 requests" in page.text_content("#corpus-fill")
        buyer, job = Identity.generate(), new_job_id()
        node.admit(job, buyer)
        node.finish(job, buyer, 9, corpus=DraftCounts(drafted=10, verified=8, accepted=6))
        # the job's corpus drafts show up live (SSE "finished"): 10 drafted, 6 of 8 verified accepted
        page.wait_for_function("""() => [...document.querySelectorAll('#draft-sources tbody tr')].some(
            r => r.cells[0].textContent === 'lookup, other requests' && r.cells[1].textContent === '10'
                 && r.cells[2].textContent === '8' && r.cells[3].textContent === '6'
                 && r.cells[4].textContent === '75%')""", timeout=8000)
        sources = [r.text_content() for r in page.query_selector_all("#draft-sources tbody tr td:first-child")]
        assert sources == ["lookup, own text", "lookup, other requests", "model drafter"]
        page.screenshot(path=str(ARTIFACTS / "dashboard-draft-sources.png"), full_page=True)
    finally:
        node.engine.corpus_fill = None
    assert page.console_problems == []


def test_a_stopped_node_is_said_to_be_unreachable_then_reloaded_when_back(tmp_path, page):
    first = NodeUnderTest(tmp_path / "first").start()
    port = first.http.port
    page.goto(first.url + "/")
    page.wait_for_function("document.getElementById('live').textContent === 'live'")
    first.stop()
    page.wait_for_function("document.getElementById('error').textContent.includes('not reachable')", timeout=8000)
    # The refreshes every 2 s and 3 s each load some panels; the warning stays whole through both,
    # and the figures are greyed out as not live.
    time.sleep(3.5)
    assert page.text_content("#error").startswith("The node is not reachable (since ")
    assert page.evaluate("document.body.classList.contains('stale')")
    # Scrolled to the end, the warning (fixed to the bottom of the window) covers no card.
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    assert page.evaluate("""(() => {
        const banner = document.getElementById('error').getBoundingClientRect();
        return Math.max(...[...document.querySelectorAll('.card')].map(c => c.getBoundingClientRect().bottom))
               <= banner.top; })()""")
    page.screenshot(path=str(ARTIFACTS / "dashboard-node-unreachable.png"), full_page=True)

    # A node back on the same address (here with a receipt signed meanwhile): every panel reloads,
    # the earnings too, which otherwise wait for a job's "finished" event.
    second = NodeUnderTest(tmp_path / "second", http_listen=f"127.0.0.1:{port}")
    buyer, job = Identity.generate(), new_job_id()
    second.admit(job, buyer)
    second.finish(job, buyer, 5)
    second.start()
    try:
        page.wait_for_function("document.getElementById('receipts').textContent === '1'", timeout=10000)
        # the job counts are this start's, the receipts the ledger's of all time: the counts say so
        assert page.text_content("#job-counts").startswith("since start: 1 admitted · 1 completed")
        assert not page.evaluate("document.body.classList.contains('stale')")
        assert page.is_hidden("#error")
        assert page.text_content("#peer-id") == second.identity.peer_id
    finally:
        second.stop()


def test_admission_names_its_limits_until_the_node_drains_then_says_so_in_the_header(tmp_path, page):
    node = NodeUnderTest(tmp_path).start()
    try:
        page.goto(node.url + "/")
        page.wait_for_function("document.getElementById('live').textContent === 'live'")
        # the limits a refused client met (the defaults of [admission])
        assert page.is_hidden("#draining") and page.text_content("#admission") == (
            "open · per client 8 at once, 120 a minute · per address 32 at once, 600 a minute · "
            "64 may wait for a slot")
        at = time.time()
        node.bus.publish(NodeDraining(grace_seconds=10, at=at))
        page.wait_for_function("!document.getElementById('draining').hidden", timeout=8000)
        shown = page.evaluate(f"new Date({at} * 1000).toLocaleTimeString()")
        assert page.text_content("#admission") == f"draining since {shown}: no new jobs; running ones get 10 s"
        assert page.console_problems == []
    finally:
        node.stop()


def test_a_refused_live_feed_is_retried(node, page, monkeypatch):
    # With every stream slot taken the node answers 503, which a browser does not retry by itself.
    monkeypatch.setattr("node.live_feed.MAX_CLIENTS", 0)
    page.goto(node.url + "/")
    page.wait_for_function("document.getElementById('live').textContent === 'reconnecting'")
    monkeypatch.setattr("node.live_feed.MAX_CLIENTS", 32)
    page.wait_for_function("document.getElementById('live').textContent === 'live'", timeout=10000)


def test_earnings_by_client_add_up_to_the_total_with_many_clients(tmp_path, page):
    node = NodeUnderTest(tmp_path)
    # Twelve clients, one receipt each: the API names ten (Ledger.totals), the table lists six.
    for tokens in range(10, 22):
        buyer, job = Identity.generate(), new_job_id()
        node.admit(job, buyer)
        node.finish(job, buyer, tokens * 1000)
    node.start()
    try:
        page.goto(node.url + "/")
        page.wait_for_function("document.getElementById('receipts').textContent === '12'")
        rows = [[c.text_content() for c in r.query_selector_all("td")]
                for r in page.query_selector_all("#per-client tbody tr")]
        assert len(rows) == 7 and rows[-1][0] == "6 more clients"
        ledger = node.ledger.totals()
        assert sum(round(float(amount) * 1e6) for _, amount in rows) == ledger.amount_micros
        assert float(page.text_content("#earned")) * 1e6 == pytest.approx(ledger.amount_micros)
    finally:
        node.stop()


def test_the_last_advert_says_when_and_what_without_its_clock_sequence(node, page):
    page.goto(node.url + "/")
    page.wait_for_function("document.getElementById('live').textContent === 'live'")
    at = time.time()
    node.bus.publish(AdvertPublished(sequence=1796172726478, free_slots=3, queue_depth=2, size_bytes=446, at=at))
    page.wait_for_function("document.getElementById('last-advert').textContent.startsWith('last advert at')",
                           timeout=8000)
    shown = page.evaluate(f"new Date({at} * 1000).toLocaleTimeString()")
    assert page.text_content("#last-advert") == f"last advert at {shown}: 3 free slots, queue 2, 446 B"


def test_refusals_say_who_was_refused_and_count_each_reason(node, page):
    page.goto(node.url + "/")
    page.wait_for_function("document.getElementById('live').textContent === 'live'")
    client = "ab" * 32
    node.bus.publish(JobRefused(reason="price_too_low", message="price cap 1 is below this node's price",
                                client=client))
    node.bus.publish(JobRefused(reason="rate_limited", message="203.0.113.7 sent 600 jobs in the last minute"))
    node.bus.publish(JobRefused(reason="rate_limited", message="203.0.113.7 sent 600 jobs in the last minute"))
    page.wait_for_function("document.getElementById('refusal-counts').textContent.includes('rate_limited 2')",
                           timeout=8000)
    assert page.text_content("#refusal-counts").endswith("rate_limited 2 · price_too_low 1")
    items = [li.text_content() for li in page.query_selector_all("#problem-list li")]
    assert any("price_too_low" in item and f"client {client[:8]}…{client[-4:]}" in item for item in items), items
    assert page.console_problems == []


def test_peers_seen_say_when_each_was_last_heard_and_show_their_strings_as_text(node, page):
    page.goto(node.url + "/")
    page.wait_for_function("document.getElementById('live').textContent === 'live'")
    two_days_ago = time.time() - 2 * 86400
    node.bus.publish(AdvertSeen(peer_id="12D3KooWGone", accepted=True, at=two_days_ago))
    node.bus.publish(AdvertSeen(peer_id="<img src=x onerror=window.pwned=1>", accepted=False,
                                reason="<b>stale</b>"))
    page.wait_for_function("document.querySelectorAll('#peers-seen li').length === 2", timeout=8000)
    gone, hostile = page.eval_on_selector_all("#peers-seen li", "items => items.map(li => li.textContent)")[::-1]
    # A peer that went quiet two days ago read the same as one advertising now; its time says the day.
    then = page.evaluate(f"new Date({two_days_ago} * 1000).toLocaleString()")
    assert gone == f"12D3KooWGone · 1 adverts, last at {then}"
    assert hostile.startswith("<img src…d=1> · 1 adverts") and hostile.endswith("dropped: <b>stale</b>")
    assert page.query_selector("#peers-seen img, #peers-seen b") is None
    assert page.evaluate("window.pwned") is None


def test_no_peers_without_bootstrap_peers_is_explained_not_left_to_read_as_a_fault(node, page):
    page.goto(node.url + "/")
    page.wait_for_function("document.getElementById('live').textContent === 'live'")
    node.bus.publish(PeerChange(connected_peers=0))
    page.wait_for_function("document.getElementById('peers-hint').textContent !== ''", timeout=8000)
    assert page.text_content("#peers-hint").startswith("no bootstrap peers set (p2p.bootstrap)")
    node.bus.publish(PeerChange(connected_peers=1))
    page.wait_for_function("document.getElementById('peers-hint').textContent === ''", timeout=8000)


def test_a_node_that_prices_time_shows_both_prices(tmp_path, page):
    node = NodeUnderTest(tmp_path, pricing={"per_mtok_micros": 250_000, "per_gpu_second_micros": 1_500}).start()
    try:
        page.goto(node.url + "/")
        page.wait_for_function("document.getElementById('price').textContent !== '-'")
        assert page.text_content("#price") == "0.250000 per Mtok + 0.001500 per GPU-second"
    finally:
        node.stop()


def test_a_draft_position_never_reached_has_no_bar(tmp_path, page):
    node = NodeUnderTest(tmp_path).start()
    try:
        # every verify budget stopped at 2 drafts: position 3 was never reached, which is not "never accepted"
        node.bus.publish(finished(new_job_id().hex(), "completed", stats(20, 8, [8, 6, 0], [6, 6, 0]),
                                  amount=1, sequence=1))
        page.goto(node.url + "/")
        page.wait_for_function("document.querySelectorAll('#chart-acceptance circle').length === 2")
        assert page.locator("#chart-acceptance rect").count() == 2
        assert page.console_problems == []
    finally:
        node.stop()


def test_a_burst_of_finished_jobs_reloads_the_panels_a_few_times_not_once_each(tmp_path, page):
    node = NodeUnderTest(tmp_path).start()
    try:
        earnings_requests = []
        page.on("request", lambda r: "/api/v1/earnings" in r.url and earnings_requests.append(r.url))
        page.goto(node.url + "/")
        page.wait_for_function("document.getElementById('live').textContent === 'live'")
        jobs = 200
        for sequence in range(1, jobs + 1):
            node.bus.publish(finished(new_job_id().hex(), "completed", stats(10, 4, [4], [2]), amount=1,
                                      sequence=sequence))
            time.sleep(0.005)
        page.wait_for_function(f"document.getElementById('job-counts').textContent.includes('{jobs} completed')",
                               timeout=10000)
        # each event made every open page fetch seven panels: 200 earnings reads here, 1400 requests in all
        assert len(earnings_requests) <= 10
    finally:
        node.stop()


def test_recent_jobs_list_all_kept_with_when_each_finished_and_for_whom(tmp_path, browser):
    node = NodeUnderTest(tmp_path)
    first = round(time.time()) - 120 + 0.25     # a quarter second: the title's milliseconds are exact
    clients = [Identity.generate().public_key.hex() for _ in range(RECENT_JOBS + 5)]
    for i, client in enumerate(clients):
        node.bus.publish(finished(new_job_id().hex(), "completed", stats(10, 4, [4], [2]), amount=1, sequence=i + 1,
                                  client=client, at=first + i))
    node.start()
    # the operator's clock, not the server's: a time zone of its own, and a 12-hour locale shown a 24-hour clock
    context = browser.new_context(viewport={"width": 1440, "height": 900}, timezone_id="Asia/Kolkata",
                                  locale="en-US")
    try:
        page = context.new_page()
        page.goto(node.url + "/")
        page.wait_for_function(f"document.querySelectorAll('#recent-jobs tbody tr').length === {RECENT_JOBS}")
        rows = page.eval_on_selector_all("#recent-jobs tbody tr", """rows => rows.map(r => ({
            cells: [...r.cells].map(c => c.textContent), when: r.cells[0].title}))""")
        newest, newest_at = rows[0], first + len(clients) - 1
        shown = datetime.fromtimestamp(newest_at, ZoneInfo("Asia/Kolkata"))
        if shown.date() == datetime.now(ZoneInfo("Asia/Kolkata")).date():
            assert newest["cells"][0] == shown.strftime("%H:%M:%S")
        else:   # run near midnight in Kolkata: the time says the day too
            assert newest["cells"][0].endswith(shown.strftime(" %H:%M:%S"))
        assert newest["when"] == datetime.fromtimestamp(newest_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.250Z")
        assert [r["cells"][2] for r in rows] == [f"{c[:8]}…{c[-4:]}" for c in reversed(clients[-RECENT_JOBS:])]
        # all 50 in a list that scrolls inside its card and, like the others, takes keyboard focus
        scrolls = page.eval_on_selector("#recent-jobs-list", "e => [e.scrollHeight > e.clientHeight, e.tabIndex]")
        assert scrolls == [True, 0]
    finally:
        context.close()
        node.stop()


def test_the_model_and_drafter_are_said_in_words_with_their_tags_in_tooltips(node, page, monkeypatch):
    monkeypatch.setattr(node.engine, "info", dataclasses.replace(node.engine.info, method="dspark",
                                                                 drafter_id="dspark+lookup"))
    page.goto(node.url + "/")
    page.wait_for_function("document.getElementById('drafter').textContent !== '-'")
    digest = bytes(range(32)).hex()
    assert page.text_content("#model") == f"smollm2-135m-instruct (float32, weights sha256 {digest[:12]}…)"
    assert digest in page.get_attribute("#model span", "title")
    assert page.text_content("#drafter") == "DSpark drafter + prompt lookup"
    assert page.get_attribute("#drafter", "title") == "method dspark, drafter dspark+lookup"
    page.wait_for_function("document.querySelectorAll('#draft-sources tbody tr').length === 3")
    assert page.get_attribute("#draft-sources tbody tr:nth-child(2) td", "title") == "source corpus"


def test_gpu_memory_says_what_the_node_holds_or_that_it_runs_on_the_cpu(node, page, two_gpus, monkeypatch):
    page.goto(node.url + "/")
    page.wait_for_function("document.getElementById('gpu-memory').textContent !== '-'")
    assert page.text_content("#gpu-memory") == "none: the engine runs on the CPU"
    monkeypatch.setattr(node.engine, "info", dataclasses.replace(node.engine.info, device="NVIDIA H200"))
    page.wait_for_function("document.getElementById('gpu-memory').textContent.startsWith('GPU 0')", timeout=8000)
    assert page.text_content("#gpu-memory") == ("GPU 0: 30.0 GiB reserved of 141.0 GiB (24.0 GiB in tensors) · "
                                                "GPU 1: 0 B reserved of 141.0 GiB (0 B in tensors)")
    assert page.console_problems == []
